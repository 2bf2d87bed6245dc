"""Building the two components from a name: a registry name or a ``package.module:Class`` import path.

:func:`build_proposer` and :func:`build_encoder` are what the command line and the
FiftyOne plugin call. A registry name (``sam2.1_hiera_t``, ``dinov2_vitl14``)
builds the bundled SAM2 / DINOv2 / DINOv3 / C-RADIO components; an import path builds a third-party
component through :func:`load_component`. Either way the result is checked
against the :mod:`refseg.method.interfaces` protocols.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import torch

from refseg.errors import InvalidInput, RefsegError

from refseg.method.config import ProposalConfig
from refseg.models.devices import select_device
from refseg.method.interfaces import FeatureEncoder, ProposalGenerator

# The paper's models, the defaults of the command line and the FiftyOne plugin
DEFAULT_PROPOSER = "sam2_hiera_l"
DEFAULT_ENCODER = "dinov2_vitl14"


class ComponentError(RefsegError, TypeError):
    """An import path names something that is not a usable proposer or encoder."""


def load_component(spec: str, **kwargs: Any) -> Any:
    """Import ``"package.module:Name"`` and call it (a class or factory) with ``kwargs``.

    ``Name`` may be dotted (``module:Class.from_config``). Only the keyword
    arguments its signature accepts are passed, unless it takes ``**kwargs``, in
    which case all are; so callers can offer a uniform set (device, checkpoint,
    config...) and a component takes what it needs.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise InvalidInput(f"component {spec!r} is not an import path of the form 'package.module:Class'")
    module_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for component {spec!r}: {exc}") from exc
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise AttributeError(f"module {module_name!r} has no attribute {attr_path!r} (component {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ComponentError(f"component {spec!r} is a {type(target).__name__}, not a class or factory")
    accepted = _accepted_kwargs(target, kwargs)
    try:
        return target(**accepted)
    except TypeError as exc:
        raise ComponentError(f"could not create component {spec!r} with arguments {sorted(accepted)}: {exc}") from exc


def _accepted_kwargs(target: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in by_name}
    return {k: v for k, v in kwargs.items() if k in names}


def _check(obj: Any, protocol: type, members: tuple[str, ...], spec: str) -> None:
    if not isinstance(obj, protocol):
        missing = [m for m in members if not hasattr(obj, m)]
        raise ComponentError(
            f"component {spec!r} built a {type(obj).__name__}, which does not implement "
            f"{protocol.__name__} (missing: {', '.join(missing) or '?'}); see refseg.method.interfaces"
        )


def build_proposer(
    spec: str,
    *,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: ProposalConfig = ProposalConfig(),
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    random_init: bool = False,
) -> ProposalGenerator:
    """A :class:`ProposalGenerator` from a SAM2 registry name or an import path.

    An import path gets the same keyword arguments (``device`` resolved to a
    :class:`torch.device`), filtered by :func:`load_component`.
    """
    from refseg.models.sam2_proposer import SAM2_VARIANTS, SAM2ProposalGenerator, sam2_variant

    if ":" in spec:
        obj = load_component(spec, device=select_device(device), checkpoint=checkpoint, config=config,
                             cache_dir=cache_dir, offline=offline, random_init=random_init)
    else:
        try:
            sam2_variant(spec)
        except KeyError:
            raise InvalidInput(
                f"unknown proposer {spec!r}: use a SAM2 model name ({', '.join(SAM2_VARIANTS)}) "
                f"or an import path 'package.module:Class'"
            ) from None
        obj = SAM2ProposalGenerator.from_name(spec, checkpoint=checkpoint, device=device, config=config,
                                              cache_dir=cache_dir, offline=offline, random_init=random_init)
    _check(obj, ProposalGenerator, ("name", "device", "propose", "masks_from_boxes", "settings"), spec)
    return obj


def build_encoder(
    spec: str,
    *,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    input_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    random_init: bool = False,
) -> FeatureEncoder:
    """A :class:`FeatureEncoder` from a registry name (DINOv2, DINOv3, C-RADIO; see :func:`encoder_names`) or
    an import path (see :func:`build_proposer`).

    ``input_size`` None is the model's own (518 for DINOv2, 512 for DINOv3 / C-RADIO; 518 is passed to an
    import path).
    """
    from refseg.models.dinov2_encoder import DEFAULT_INPUT_SIZE, DINOv2Encoder, dinov2_variant
    from refseg.models.timm_encoder import TimmEncoder, timm_variant

    kwargs = dict(checkpoint=checkpoint, cache_dir=cache_dir, offline=offline, random_init=random_init)
    if ":" in spec:
        obj = load_component(spec, device=select_device(device), input_size=input_size or DEFAULT_INPUT_SIZE,
                             **kwargs)
    elif _known(dinov2_variant, spec):
        obj = DINOv2Encoder.from_name(spec, device=device, input_size=input_size or DEFAULT_INPUT_SIZE, **kwargs)
    elif _known(timm_variant, spec):
        obj = TimmEncoder.from_name(spec, device=device, input_size=input_size, **kwargs)
    else:
        raise InvalidInput(
            f"unknown encoder {spec!r}: use a registered model name ({', '.join(encoder_names())}) "
            f"or an import path 'package.module:Class'"
        )
    _check(obj, FeatureEncoder, ("name", "input_size", "patch_size", "dim", "device", "encode", "settings"), spec)
    return obj


def _known(lookup, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def encoder_names() -> tuple[str, ...]:
    """The registered encoder names, DINOv2 (the paper's) first, then DINOv3 and C-RADIO."""
    from refseg.models.dinov2_encoder import DINOV2_VARIANTS
    from refseg.models.timm_encoder import TIMM_VARIANTS

    return (*DINOV2_VARIANTS, *TIMM_VARIANTS)


def is_registered_encoder(name: str) -> bool:
    """Whether ``name`` is a registered encoder name or alias (``dinov2_vits14_reg4``, ``dinov3_vits16``...)."""
    from refseg.models.dinov2_encoder import dinov2_variant
    from refseg.models.timm_encoder import timm_variant

    return _known(dinov2_variant, name) or _known(timm_variant, name)

"""One run specification: which models, with which weights, at which settings.

A :class:`RunSpec` is everything needed to build the same :class:`~refseg.Segmenter`
anywhere: in the command line, in the FiftyOne plugin (it is stored with each bank),
and in every device worker. It is frozen, checked when made (an unknown or ill-typed
override, an unknown preset is a :class:`RunSpecError` naming it), and travels as a
plain dict (:meth:`RunSpec.to_dict` / :meth:`RunSpec.from_dict`).

Overrides are text or values, parsed by one rule: :func:`parse_overrides` splits
``"merge.top_k=50, proposal.image_size=512"`` (or ``["merge.top_k=50", ...]``, pairs, a
dict) into ``(dotted key, value)`` pairs, and :meth:`~refseg.PipelineConfig.with_overrides`
reads a text value as the type of the setting it replaces.

Random weights (``random_init``, for trying the flow and for tests) are drawn from
``seed`` before each network, so every process builds the very same networks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from refseg.errors import RefsegError
from refseg.method.config import PRESETS, PipelineConfig, get_preset
from refseg.models.registry import DEFAULT_ENCODER, DEFAULT_PROPOSER, build_encoder, build_proposer

Overrides = tuple[tuple[str, Any], ...]


class RunSpecError(RefsegError, ValueError):
    """A run specification that cannot be used: unknown preset, unknown or ill-typed override."""


def parse_overrides(overrides: str | dict | Iterable | None) -> Overrides:
    """Settings overrides as ``((dotted key, value), ...)``, in the order given (a later one wins).

    Accepts text such as ``"proposal.image_size=256, merge.top_k=50"`` (items separated by
    commas, semicolons or new lines), a list of such texts (``--set`` given several times),
    ``(key, value)`` pairs, or a dict. Values given as text stay text: the setting's type reads them.
    """
    if not overrides:
        return ()
    if isinstance(overrides, dict):
        return tuple((str(k), v) for k, v in overrides.items())
    if isinstance(overrides, str):
        overrides = [overrides]
    items: list[tuple[str, Any]] = []
    for entry in overrides:
        if isinstance(entry, str):
            for part in re.split(r"[,;\n]+", entry):
                part = part.strip()
                if not part:
                    continue
                key, sep, value = part.partition("=")
                if not sep or not key.strip():
                    raise RunSpecError(f"setting override {part!r} is not of the form key=value "
                                       "(e.g. merge.top_k=50)")
                items.append((key.strip(), value.strip()))
        else:
            key, value = entry
            items.append((str(key), value))
    return tuple(items)


def format_overrides(overrides: Iterable[tuple[str, Any]]) -> str:
    """Inverse of :func:`parse_overrides` for text: ``"merge.top_k=50, merge.merge_resolution=none"``."""
    def text(value: Any) -> str:
        return "none" if value is None else value if isinstance(value, str) else json.dumps(value)

    return ", ".join(f"{k}={text(v)}" for k, v in overrides)


@dataclass(frozen=True)
class RunSpec:
    """Models, weights and settings of one run (see the module docstring).

    ``encoder_input_size`` None is the encoder's own default (518 for DINOv2, the paper's).
    ``cache_dir`` and ``offline`` say where weights come from; they do not change the
    results (the weights' content is in the run's identity, :meth:`refseg.Segmenter.identity`).
    """

    proposer: str = DEFAULT_PROPOSER
    encoder: str = DEFAULT_ENCODER
    preset: str = "default"
    overrides: Overrides = ()
    encoder_input_size: int | None = None
    proposer_checkpoint: str | None = None
    encoder_checkpoint: str | None = None
    random_init: bool = False
    seed: int = 0
    cache_dir: str | None = None
    offline: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", parse_overrides(self.overrides))
        for name in ("proposer_checkpoint", "encoder_checkpoint", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        for name in ("proposer", "encoder", "preset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RunSpecError(f"{name} must be a non-empty name, got {getattr(self, name)!r}")
        if self.encoder_input_size is not None and (isinstance(self.encoder_input_size, bool) or
                                                    not isinstance(self.encoder_input_size, int) or
                                                    self.encoder_input_size < 1):
            raise RunSpecError(f"encoder input size must be a positive integer, got {self.encoder_input_size!r}")
        self.config()  # an unknown preset or override fails here, where it was written

    # ------------------------------------------------------------------ settings

    def config(self) -> PipelineConfig:
        """The preset with the overrides applied."""
        if self.preset not in PRESETS:
            raise RunSpecError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            return get_preset(self.preset).with_overrides(**dict(self.overrides))
        except (KeyError, TypeError, ValueError) as exc:
            raise RunSpecError(f"bad setting override: {exc.args[0] if exc.args else exc}") from None

    def with_changes(self, **changes: Any) -> "RunSpec":
        """A copy with fields changed; a value of None or "" leaves that field as it is."""
        changes = {k: v for k, v in changes.items() if v is not None and v != ""}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise RunSpecError(f"unknown run setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A plain dict (JSON and BSON: overrides as a list of pairs, since their keys hold dots)."""
        d = dataclasses.asdict(self)
        d["overrides"] = [[k, v] for k, v in self.overrides]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        """Inverse of :meth:`to_dict`. Missing fields take their defaults; unknown ones are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RunSpecError(f"unknown run setting(s) {', '.join(sorted(unknown))} in a stored run specification")
        return cls(**data)

    # ------------------------------------------------------------------ building

    def _seeded(self, build):
        if not self.random_init:
            return build()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build()

    def build_proposer(self, device: str | torch.device | None = None):
        """The proposal generator (for :attr:`random_init`, drawn from :attr:`seed`)."""
        return self._seeded(lambda: build_proposer(
            self.proposer, device=device, checkpoint=self.proposer_checkpoint, config=self.config().proposal,
            cache_dir=self.cache_dir, offline=self.offline, random_init=self.random_init))

    def build_encoder(self, device: str | torch.device | None = None):
        """The feature encoder (for :attr:`random_init`, drawn from :attr:`seed`)."""
        return self._seeded(lambda: build_encoder(
            self.encoder, device=device, checkpoint=self.encoder_checkpoint, input_size=self.encoder_input_size,
            cache_dir=self.cache_dir, offline=self.offline, random_init=self.random_init))

    def build_segmenter(self, bank, device: str | torch.device | None = None, *, proposer=None, encoder=None):
        """The :class:`~refseg.Segmenter` of this run with ``bank`` on ``device``.

        The bank refuses an encoder whose features differ from its own (before the proposal
        model is loaded). ``proposer``/``encoder`` pass models already built from this spec.
        """
        from refseg.method.pipeline import Segmenter

        encoder = encoder if encoder is not None else self.build_encoder(device)
        bank.check_encoder(encoder.settings())
        proposer = proposer if proposer is not None else self.build_proposer(device)
        return Segmenter(proposer, encoder, bank, self.config())

"""The two extension points: a mask proposal generator and a dense feature encoder.

Any object with these attributes and methods can be plugged in, from Python or
from the command line by import path (``--proposer package.module:Class``,
``--encoder package.module:Class``; see :func:`refseg.models.registry.load_component`).
Images cross these interfaces as float tensors in [0, 1] (no normalisation: each
component normalises for itself), on the component's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Proposals:
    """Class-agnostic mask proposals for one image, in the square model frame.

    logits:   [N, h, w] float mask logits (SAM2: h = w = 256); mask = logits > 0.
    pred_iou: [N] float, the proposer's own quality estimate, used for ranking.
    prompt_index: optional [N] int64, the index of the prompt (in the proposer's ``prompt_points``) each
              proposal came from; None when the proposer has no prompts or does not say.
    """

    logits: torch.Tensor
    pred_iou: torch.Tensor
    prompt_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.pred_iou.shape[0])

    @classmethod
    def empty(cls, size: int = 256, device: torch.device | str = "cpu") -> "Proposals":
        return cls(torch.zeros(0, size, size, device=device), torch.zeros(0, device=device))


@runtime_checkable
class ProposalGenerator(Protocol):
    """Proposes class-agnostic masks.

    ``propose`` takes images squashed to ``[B, 3, S, S]`` (S = the pipeline's
    ``proposal.image_size``) in [0, 1] and returns one :class:`Proposals` per image.
    ``masks_from_boxes`` turns boxes (``[K, 4]`` xyxy in pixels of the S x S frame)
    into mask logits ``[K, h, w]`` on one image ``[3, S, S]``; it is used for
    box-only references.

    Optional, for prompt selection (``proposal.prompt_similarity``, see
    :mod:`refseg.method.prompt_selection`): a proposer prompted with points has a
    ``prompt_points`` attribute (``[P, 2]`` float (x, y) pixels of the S x S frame) and takes
    ``propose(images, prompt_mask=M)`` with ``M`` ``[B, P]`` bool: the prompts to decode (a
    False prompt yields no proposal). Proposers without them work whenever the option is off.
    """

    name: str
    device: torch.device

    def propose(self, images: torch.Tensor) -> list[Proposals]: ...

    def masks_from_boxes(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor: ...

    def settings(self) -> dict:
        """JSON-able identity of the proposals (model, weights' content, settings): runs, caches and
        resumed jobs compare it, so whatever changes the proposals must change it."""
        ...


@runtime_checkable
class FeatureEncoder(Protocol):
    """Dense patch features.

    ``encode`` takes ``[B, 3, input_size, input_size]`` in [0, 1] and returns
    ``[B, input_size // patch_size, input_size // patch_size, dim]`` float features
    (DINOv2: last block's patch tokens after the final norm).
    ``settings`` is a JSON-able dict that identifies the features (name, weights,
    input size...): a memory bank refuses an encoder whose settings differ.
    """

    name: str
    input_size: int
    patch_size: int
    dim: int
    device: torch.device

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def settings(self) -> dict: ...


def supports_prompt_selection(proposer) -> bool:
    """Whether ``proposer`` has the optional prompt-selection interface of :class:`ProposalGenerator`."""
    import inspect

    if getattr(proposer, "prompt_points", None) is None:
        return False
    try:
        return "prompt_mask" in inspect.signature(proposer.propose).parameters
    except (TypeError, ValueError):
        return False

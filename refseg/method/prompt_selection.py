"""Prompts where the bank can match: an opt-in speed-up of stage 1 (``proposal.prompt_similarity``).

SAM2's prompt decoder is most of stage 1's time at paper settings (1024 grid prompts), and
most prompts land on background. With ``proposal.prompt_similarity = t`` the encoder's patch
features are computed first; each grid point takes the patch feature under it (the point's
place in the S x S frame scaled to the encoder's patch grid), and the point is decoded only
when the cosine of that feature to some class prototype is >= t. The proposals of the decoded
prompts are exactly paper mode's (:func:`refseg.models.sam2_proposer.prompt_batches`); the
proposals of skipped prompts are missing, and with them the detections they would have made.

``t`` is chosen per bank by :func:`estimate_prompt_threshold`: each reference image is labelled
in paper mode with the bank minus its own references (leave-one-out, as
:mod:`refseg.method.thresholds` does), each final detection records the similarity of the
prompt that produced it (its ``candidate_index`` names its proposal, whose ``prompt_index``
names the prompt), and ``t`` is the highest threshold keeping at least ``share`` of those
detections. It is stored with the bank (:attr:`refseg.MemoryBank.prompt_similarity`), tied to
the embeddings, and ``proposal.prompt_similarity = "bank"`` applies it (refused if none or stale).

The estimate assumes that a detection stays when its prompt is decoded; in fact removing other
proposals can change NMS and merging slightly, so the share kept on new images is an estimate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from refseg.errors import RefsegError
from refseg.method.thresholds import HeldOutImage


HOW_TO_CHOOSE = ("refseg calibrate --prompt-share 0.95, or the plugin's calibrate_thresholds with its prompt "
                 "threshold option")


class PromptSelectionError(RefsegError, ValueError):
    """Prompt selection that cannot be used (no threshold stored, a stale one, a proposer without prompts...)."""


def point_patches(points: torch.Tensor, image_size: int, encoder_input: int, patch_size: int) -> torch.Tensor:
    """The patch under each point: ``[P]`` flat indices (row-major) into the encoder's ``g x g`` grid,
    g = encoder_input // patch_size. ``points`` ``[P, 2]`` are (x, y) pixels of the S x S frame, which the
    encoder sees resized to ``encoder_input`` (so a pixel maps to ``x * encoder_input / S``)."""
    g = encoder_input // patch_size
    scale = encoder_input / (image_size * patch_size)
    cells = torch.floor(points.to(torch.float64) * scale).long().clamp_(0, g - 1)  # [P, 2] (col, row)
    return cells[:, 1] * g + cells[:, 0]


def prompt_similarities(patch_features: torch.Tensor, prototypes: torch.Tensor, patches: torch.Tensor
                        ) -> torch.Tensor:
    """``[B, P]`` highest cosine of each prompt's patch feature to the class prototypes.

    patch_features ``[B, g, g, D]``; prototypes ``[C, D]`` unit vectors; patches ``[P]`` from :func:`point_patches`.
    """
    b, gy, gx, d = patch_features.shape
    feats = patch_features.reshape(b, gy * gx, d)[:, patches.to(patch_features.device)]  # [B, P, D]
    feats = F.normalize(feats.float(), dim=-1)
    return (feats @ prototypes.to(feats.device, torch.float32).T).amax(dim=-1)


def choose_prompt_threshold(similarities: Iterable[float], share: float) -> float | None:
    """The highest threshold t with at least ``share`` of ``similarities`` >= t (None when there are none)."""
    values = np.sort(np.asarray(list(similarities), dtype=np.float64))[::-1]
    if values.size == 0:
        return None
    need = max(1, math.ceil(share * values.size - 1e-9))  # detections that must stay
    return float(values[need - 1])


@dataclass
class PromptThreshold:
    """What :func:`estimate_prompt_threshold` found on the reference images."""

    share: float  # the share of detections asked for
    threshold: float | None  # None: no detection on the references, nothing to choose from
    detections: int = 0  # leave-one-out detections on the references
    kept: int = 0  # of them, made by a prompt at or above the threshold
    prompts: int = 0  # grid prompts on the references
    prompts_kept: int = 0  # of them, at or above the threshold (decoded)
    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("failed")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PromptThreshold":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "failed"})

    def describe(self) -> str:
        if self.threshold is None:
            return f"no detection on the {self.images} reference image(s): no prompt threshold"
        return (f"prompt similarity >= {self.threshold:.4f}: keeps {self.kept} of {self.detections} detections "
                f"(asked {self.share:.0%}) and decodes {self.prompts_kept} of {self.prompts} prompts "
                f"({self.prompts_kept / max(1, self.prompts):.0%}) on {self.images} reference image(s)")


def detection_prompt_similarities(cand, dets) -> np.ndarray:
    """The prompt similarity of the candidate each detection of ``dets`` (``Segmenter.label(cand)``) came from:
    the detection's ``candidate_index`` names its candidate, whose ``prompt_index`` names its prompt."""
    if cand.prompt_similarities is None or cand.prompt_index is None:
        raise PromptSelectionError("the candidates carry no prompt similarities: propose them with "
                                   "Segmenter.propose(images, with_prompt_similarities=True) and a proposer that "
                                   "reports its prompts")
    if dets.candidate_index is None or (dets.candidate_index >= len(cand)).any():
        raise PromptSelectionError("the detections do not name their candidates among these: label the "
                                   "candidates they were proposed from with Segmenter.label")
    per_candidate = cand.prompt_similarities[cand.prompt_index.to(cand.prompt_similarities.device)]
    return per_candidate.cpu().numpy().astype(np.float64)[dets.candidate_index]


def check_share(share: float) -> None:
    """Refuse a share of detections to keep outside (0, 1]."""
    if not 0 < share <= 1:
        raise PromptSelectionError(f"the share of detections to keep must be in (0, 1], got {share!r}")


def estimate_prompt_threshold(segmenter, held_out: Iterable[HeldOutImage], share: float = 0.95
                              ) -> PromptThreshold:
    """Leave-one-out over the reference images with the models and settings of ``segmenter``, every prompt
    decoded (prompt selection off, class thresholds not applied), and :func:`choose_prompt_threshold`."""
    from refseg.io.images import ImageLoadError, load_image
    from refseg.method.pipeline import Segmenter

    check_share(share)
    config = segmenter.config
    every_prompt = dataclasses.replace(config, proposal=dataclasses.replace(config.proposal, prompt_similarity=None),
                                       merge=dataclasses.replace(config.merge, class_thresholds=False))
    found = PromptThreshold(float(share), None)
    detection_sims, prompt_sims = [], []
    for item in held_out:
        left_out = Segmenter(segmenter.proposer, segmenter.encoder, segmenter.bank.without(item.entry_ids),
                             every_prompt)
        try:
            rgb = load_image(item.image)
        except (ImageLoadError, OSError) as exc:
            found.failed.append((item.name or str(item.image), str(exc)))
            continue
        cand = left_out.propose([rgb], with_prompt_similarities=True)[0]
        detection_sims.append(detection_prompt_similarities(cand, left_out.label(cand)))
        prompt_sims.append(cand.prompt_similarities.cpu().numpy().astype(np.float64))
        found.images += 1
    sims = np.concatenate(detection_sims) if detection_sims else np.zeros(0)
    prompts = np.concatenate(prompt_sims) if prompt_sims else np.zeros(0)
    found.threshold = choose_prompt_threshold(sims, share)
    found.detections, found.prompts = int(sims.size), int(prompts.size)
    if found.threshold is not None:
        found.kept = int((sims >= found.threshold).sum())
        found.prompts_kept = int((prompts >= found.threshold).sum())
    return found


def store_prompt_threshold(bank, found: PromptThreshold) -> None:
    """Keep ``found`` with ``bank`` (saved in its file), tied to the bank's current embeddings."""
    bank.prompt_similarity = {**found.to_dict(), "embeddings_sha256": bank.embeddings_sha256()}


def stored_prompt_threshold(bank, where: str = "the bank") -> float:
    """The prompt threshold stored with ``bank``; refused when there is none or the bank changed since."""
    stored = bank.prompt_similarity
    if not stored or stored.get("threshold") is None:
        raise PromptSelectionError(f"{where} holds no prompt similarity threshold: choose one first ({HOW_TO_CHOOSE})")
    if stored.get("embeddings_sha256") != bank.embeddings_sha256():
        raise PromptSelectionError(f"the prompt similarity threshold of {where} was chosen for other references (the "
                                   f"bank changed since): choose it again ({HOW_TO_CHOOSE})")
    return float(stored["threshold"])


def resolve_prompt_threshold(setting, bank) -> float | None:
    """The threshold a ``proposal.prompt_similarity`` setting means with ``bank``: None (off), the number, or
    for ``"bank"`` the stored one (:func:`stored_prompt_threshold`)."""
    if setting is None:
        return None
    if setting == "bank":
        return stored_prompt_threshold(bank)
    return float(setting)

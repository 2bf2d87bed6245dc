"""Calibrating a bank on its own reference images: what ``refseg calibrate`` and the plugin's
``calibrate_thresholds`` run.

Two estimates, each leave-one-out on the reference images, each asked for on its own:

- per-class score thresholds reaching a target precision (:func:`refseg.method.thresholds.estimate_thresholds`;
  needs the images' annotated instances);
- the prompt-selection threshold keeping a share of the detections
  (:func:`refseg.method.prompt_selection.estimate_prompt_threshold`; needs a proposer with prompt points,
  no annotation).

:func:`calibrate_bank` runs the ones asked for and stores them with the bank, tied to its embeddings
(what is not asked for stays as it was). Saving the bank is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from refseg.method.interfaces import supports_prompt_selection
from refseg.method.prompt_selection import (PromptSelectionError, PromptThreshold, check_share,
                                            estimate_prompt_threshold, store_prompt_threshold)
from refseg.method.thresholds import (HeldOutImage, ThresholdError, ThresholdReport, check_target_precision,
                                      estimate_thresholds, store_thresholds)


@dataclass
class Calibration:
    """What :func:`calibrate_bank` estimated (None: not asked for)."""

    thresholds: ThresholdReport | None = None
    prompt: PromptThreshold | None = None

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(image, reason) of each reference image that could not be read, once."""
        found = [*(self.thresholds.failed if self.thresholds else []), *(self.prompt.failed if self.prompt else [])]
        return list(dict.fromkeys(found))

    @property
    def images(self) -> int:
        """Reference images labelled."""
        return max(self.thresholds.images if self.thresholds else 0, self.prompt.images if self.prompt else 0)

    def lines(self) -> list[str]:
        """One line per class threshold, then one for the prompt threshold."""
        return [*(self.thresholds.lines() if self.thresholds else []), *([self.prompt.describe()] if self.prompt else [])]


def calibrate_bank(segmenter, held_out: Iterable[HeldOutImage], target_precision: float | None = 0.9,
                   prompt_share: float | None = None) -> Calibration:
    """Estimate, with the models, bank and settings of ``segmenter`` (its ``merge.class_thresholds`` off), the
    class thresholds reaching ``target_precision`` and / or the prompt threshold keeping ``prompt_share`` of the
    detections (None: not that one), and store them with ``segmenter.bank``.

    Both settings, and that the proposer has prompts, are checked before anything is labelled.
    """
    if target_precision is None and prompt_share is None:
        raise ThresholdError("nothing to calibrate: give a target precision (class thresholds), a share of "
                             "detections to keep (prompt threshold), or both")
    if target_precision is not None:
        check_target_precision(target_precision)
    if prompt_share is not None:
        check_share(prompt_share)
        if not supports_prompt_selection(segmenter.proposer):
            raise PromptSelectionError(f"a prompt threshold needs a proposer with prompt points (SAM2's grid); "
                                       f"{type(segmenter.proposer).__name__} has none")
    held_out = list(held_out)
    found = Calibration()
    if target_precision is not None:
        found.thresholds = estimate_thresholds(segmenter, held_out, target_precision)
        store_thresholds(segmenter.bank, found.thresholds)
    if prompt_share is not None:
        found.prompt = estimate_prompt_threshold(segmenter, held_out, prompt_share)
        store_prompt_threshold(segmenter.bank, found.prompt)
    return found

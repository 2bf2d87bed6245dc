"""Per-class score thresholds that reach a target precision, estimated from the references themselves.

Each reference image is labelled with the bank *minus that image's own references*
(leave-one-out), and its annotated instances of the bank's classes are the ground truth.
A detection is a true positive when its mask overlaps a not yet matched instance of its
class with IoU >= 0.5 (greedily, best score first, as COCO's evaluation matches). Per
class, the threshold is the lowest score at which the detections scoring at least that
much are precise enough; the estimate says how precise, with what recall, on how many
instances. This needs the reference images' instances of the bank's classes to be
*fully* annotated: an unannotated object that is found counts as a false positive.

The thresholds are stored with the bank (:attr:`refseg.MemoryBank.thresholds`) together
with a checksum of the embeddings they were estimated for, and applied on request
(:func:`apply_thresholds`): a bank changed since refuses to apply stale ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from refseg.errors import RefsegError
from refseg.method.results import Detections, encode_rles

MATCH_IOU = 0.5

REACHED = "reached"  # a threshold reaches the target precision on the references
UNREACHABLE = "unreachable"  # no threshold does: applying the thresholds drops the class's detections
NO_DATA = "no data"  # no annotated instance or no detection: no threshold (nothing is dropped)


class ThresholdError(RefsegError, ValueError):
    """Thresholds that cannot be estimated or applied (none stored, estimated for another bank content...)."""


@dataclass
class HeldOutImage:
    """One reference image for leave-one-out: the image, the bank entries it contributed (left out while
    it is labelled), and its annotated instances (ground truth): masks [G, H, W] bool and their classes."""

    image: Any  # anything Segmenter.predict takes: a path or an RGB array
    entry_ids: Sequence[str]
    truth_masks: np.ndarray
    truth_classes: Sequence[str]
    name: str = ""


@dataclass
class ClassThreshold:
    """The estimate for one class (see the module docstring)."""

    class_name: str
    status: str
    threshold: float | None  # keep detections scoring >= this (None: not estimated)
    precision: float | None  # on the references, at the threshold
    recall: float | None
    instances: int  # annotated instances on the reference images
    detections: int  # leave-one-out detections of the class (above the threshold: kept)
    kept: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassThreshold":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def describe(self) -> str:
        if self.status == REACHED:
            return (f"{self.class_name}: score >= {self.threshold:.3f} (precision {self.precision:.2f}, recall "
                    f"{self.recall:.2f}; {self.kept} of {self.detections} detections, {self.instances} instances)")
        if self.status == UNREACHABLE:
            return (f"{self.class_name}: target not reached at any score ({self.detections} detections, "
                    f"{self.instances} instances; best precision {self.precision:.2f}): its detections are dropped "
                    "when thresholds are applied")
        return (f"{self.class_name}: no estimate ({self.instances} instances, {self.detections} detections on the "
                "references): its detections are kept")


@dataclass
class ThresholdReport:
    """What :func:`estimate_thresholds` found: per class, and the setting that chose it."""

    target_precision: float
    classes: dict[str, ClassThreshold] = field(default_factory=dict)
    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)

    def to_dict(self) -> dict:
        return {"target_precision": self.target_precision, "images": self.images, "match_iou": MATCH_IOU,
                "classes": {c: t.to_dict() for c, t in self.classes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ThresholdReport":
        return cls(float(d["target_precision"]), {c: ClassThreshold.from_dict(t) for c, t in d["classes"].items()},
                   int(d.get("images", 0)))

    def lines(self) -> list[str]:
        return [t.describe() for t in self.classes.values()]


def match_detections(dets: Detections, truth_masks: np.ndarray, truth_classes: Sequence[str],
                     iou: float = MATCH_IOU) -> list[tuple[str, float, bool]]:
    """(class, score, true positive?) of every detection; each instance matches at most one detection."""
    out: list[tuple[str, float, bool]] = []
    truth_classes = list(truth_classes)
    truth_rles = encode_rles(truth_masks)
    det_rles = dets.rles()  # from the compact masks, without making every full mask at once
    names = [dets.class_names[int(lab)] for lab in dets.labels]
    matched = [False] * len(truth_rles)
    for i in np.argsort(-np.asarray(dets.scores, dtype=np.float64), kind="stable"):
        candidates = [g for g, c in enumerate(truth_classes) if c == names[i] and not matched[g]]
        hit = False
        if candidates:
            ious = mask_utils.iou([det_rles[i]], [truth_rles[g] for g in candidates], [0] * len(candidates))[0]
            best = int(np.argmax(ious))
            if ious[best] >= iou:
                matched[candidates[best]] = hit = True
        out.append((names[i], float(dets.scores[i]), hit))
    return out


def choose_threshold(class_name: str, scored: Iterable[tuple[float, bool]], instances: int,
                     target_precision: float) -> ClassThreshold:
    """The lowest score whose detections at or above it reach ``target_precision``."""
    scored = sorted(scored, key=lambda s: -s[0])
    n = len(scored)
    if n == 0 or instances == 0:
        return ClassThreshold(class_name, NO_DATA, None, None, None, instances, n)
    best: tuple[int, float, float] | None = None  # (kept, precision, recall) at the lowest qualifying cut
    best_precision = 0.0
    tp = 0
    for k, (score, hit) in enumerate(scored, start=1):
        tp += hit
        if k < n and scored[k][0] == score:
            continue  # a threshold keeps all detections of equal score or none
        precision = tp / k
        best_precision = max(best_precision, precision)
        if precision >= target_precision:
            best = (k, precision, tp / instances)
    if best is None:
        return ClassThreshold(class_name, UNREACHABLE, None, best_precision, None, instances, n)
    kept, precision, recall = best
    return ClassThreshold(class_name, REACHED, scored[kept - 1][0], precision, recall, instances, n, kept)


def check_target_precision(target_precision: float) -> None:
    """Refuse a target precision outside (0, 1]."""
    if not 0 < target_precision <= 1:
        raise ThresholdError(f"the target precision must be in (0, 1], got {target_precision!r}")


def estimate_thresholds(segmenter, held_out: Iterable[HeldOutImage], target_precision: float = 0.9
                        ) -> ThresholdReport:
    """Leave-one-out labelling of the reference images with the models, bank and settings of ``segmenter``
    (a :class:`~refseg.Segmenter`) and :func:`choose_threshold` per bank class.

    Detections are taken before any score threshold of the settings (``merge.score_threshold`` is set to 0
    for the estimate). An image that cannot be read is listed in ``report.failed``.
    """
    from refseg.io.images import ImageLoadError
    from refseg.method.pipeline import Segmenter

    check_target_precision(target_precision)
    bank, config = segmenter.bank, segmenter.config
    every_score = dataclasses.replace(config, merge=dataclasses.replace(config.merge, score_threshold=0.0))
    report = ThresholdReport(float(target_precision))
    scored: dict[str, list[tuple[float, bool]]] = {c: [] for c in bank.class_names}
    instances = {c: 0 for c in bank.class_names}
    for item in held_out:
        # the bank without this image's own references: the image is labelled as an unseen one would be
        left_out = Segmenter(segmenter.proposer, segmenter.encoder, bank.without(item.entry_ids), every_score)
        try:
            dets = left_out.predict(item.image)
        except (ImageLoadError, OSError) as exc:
            report.failed.append((item.name or str(item.image), str(exc)))
            continue
        report.images += 1
        for c in item.truth_classes:
            if c in instances:
                instances[c] += 1
        for c, score, hit in match_detections(dets, item.truth_masks, item.truth_classes):
            scored[c].append((score, hit))
    for c in bank.class_names:
        report.classes[c] = choose_threshold(c, scored[c], instances[c], target_precision)
    return report


def apply_thresholds(dets: Detections, report: ThresholdReport) -> Detections:
    """The detections that pass their class's threshold (a class without an estimate keeps all of its own;
    one whose target was unreachable keeps none)."""
    keep = np.ones(len(dets), dtype=bool)
    for i, label in enumerate(dets.labels):
        estimate = report.classes.get(dets.class_names[int(label)])
        if estimate is None or estimate.status == NO_DATA:
            continue
        keep[i] = estimate.status == REACHED and float(dets.scores[i]) >= estimate.threshold
    return dets[np.nonzero(keep)[0]]


def store_thresholds(bank, report: ThresholdReport) -> None:
    """Keep ``report`` with ``bank`` (saved in its file), tied to the bank's current embeddings."""
    bank.thresholds = {**report.to_dict(), "embeddings_sha256": bank.embeddings_sha256()}


def stored_thresholds(bank, where: str = "the bank") -> ThresholdReport:
    """The thresholds stored with ``bank``; refused when there are none or the bank changed since."""
    if not bank.thresholds:
        raise ThresholdError(f"{where} holds no class thresholds: estimate them first (refseg calibrate, or the "
                             "plugin's calibrate_thresholds)")
    if bank.thresholds.get("embeddings_sha256") != bank.embeddings_sha256():
        raise ThresholdError(f"the class thresholds of {where} were estimated for other references (the bank changed "
                             "since): estimate them again before applying them")
    return ThresholdReport.from_dict(bank.thresholds)

"""Correcting auto-labels: what a person changed, new masks for corrected boxes, corrections kept on re-labelling.

Every detection refseg writes carries a fingerprint (``refseg_fp``, :func:`fingerprint`):
a digest of its label, box and mask, then one of the box alone and one of the mask alone.
A person's edit in the App's Annotate tab (label, repainted mask, box) or in Python changes
what the fingerprint describes, and a detection a person added has none:
:func:`find_corrections` tags both ``corrected``. :func:`remask_boxes` gives corrected (or
selected) boxes a new mask from the proposer's box prompt; a mask a person painted is
kept (:func:`needs_new_mask`). When ``auto_label`` labels a sample again,
:func:`merge_with_review` (called by the FiftyOne sink) keeps what a person corrected or
reviewed and drops the new predictions that repeat one of those.

What FiftyOne 1.22.1's Annotate tab saves (see ``fiftyone_plugin/README.md``): a label
change as a patch of ``label``; a painted mask as the whole mask re-drawn at the App's
display resolution (a ``uint8`` 0/1 crop of another size than the box's pixels) with the
box refitted to the mask's extent; *Remove mask* as ``mask: null``; a new box as a
box-only detection. :func:`refseg_fiftyone.convert.detection_mask` resizes such a crop to
its box, so every consumer here reads it in image pixels.
"""

from __future__ import annotations

import hashlib
from typing import Generator, Iterable

import numpy as np

import fiftyone as fo

import refseg
from refseg import ImageLoadError
from refseg.runtime.run_spec import RunSpec

from . import core
from .convert import box_to_pixels, detection_mask

FINGERPRINT_ATTR = "refseg_fp"  # on each detection refseg wrote: fingerprint() at writing time
DEFAULT_CORRECTED_TAG = "corrected"
ONLY_CHOICES = ("corrected", "selected")
_WHOLE = 16  # hex digits of the label-box-mask digest: all of a fingerprint written before the parts were added
_PART = 6  # hex digits of the box digest, then of the mask digest


def _has_mask(detection: fo.Detection) -> bool:
    return detection.mask is not None or bool(detection.mask_path)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _mask_digest(mask) -> str:
    """The mask's shape and pixels (any nonzero value counts as the object)."""
    if mask is None:
        return _digest(b"none")
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., 0]
    pixels = np.ascontiguousarray(array > 0)
    return _digest(f"{pixels.shape}|".encode() + np.packbits(pixels).tobytes())


def fingerprint(detection: fo.Detection) -> str:
    """What a reviewer can change on a detection, as 28 hex digits: a digest of its label, box (6 decimals),
    mask shape and area (16 digits, the whole fingerprint of earlier versions), then a digest of the box
    alone and one of the mask's pixels alone (6 digits each), so that :func:`needs_new_mask` can tell a
    repainted mask from a moved box."""
    box = ",".join(f"{float(v):.6f}" for v in (detection.bounding_box or ()))
    mask = detection.get_mask() if _has_mask(detection) else None
    shape = "none" if mask is None else f"{np.shape(mask)}:{int(np.count_nonzero(mask))}"
    whole = _digest(f"{detection.label}|{box}|{shape}".encode())[:_WHOLE]
    return whole + _digest(box.encode())[:_PART] + _mask_digest(mask)[:_PART]


def stamp(detections: Iterable[fo.Detection]) -> None:
    """Store each detection's :func:`fingerprint` on it (done when refseg writes its predictions)."""
    for det in detections:
        det[FINGERPRINT_ATTR] = fingerprint(det)


def _stored(detection: fo.Detection) -> str | None:
    return detection.get_field(FINGERPRINT_ATTR) if detection.has_field(FINGERPRINT_ATTR) else None


def _unchanged(stored: str, detection: fo.Detection) -> bool:
    """``stored`` (a fingerprint of this or an earlier version) still describes ``detection``."""
    current = fingerprint(detection)
    return stored == current or (len(stored) == _WHOLE and stored == current[:_WHOLE])


def is_corrected(detection: fo.Detection, corrected_tag: str = DEFAULT_CORRECTED_TAG) -> bool:
    """True for a detection a person changed (fingerprint differs), added (none), or tagged ``corrected_tag``."""
    if corrected_tag in (detection.tags or []):
        return True
    stored = _stored(detection)
    return stored is None or not _unchanged(stored, detection)


def needs_new_mask(detection: fo.Detection, corrected_tag: str = DEFAULT_CORRECTED_TAG) -> bool:
    """Whether ``remask_boxes(only="corrected")`` prompts ``detection``'s box: a corrected detection whose box
    has no mask that fits it.

    That is one without a mask (drawn as a box, or its mask removed), or one whose box changed while its mask
    is still the one refseg wrote. A mask a person made is kept: one painted in the App (which saves the
    repainted mask and fits the box to it), or the mask of a detection a person added. A detection whose
    fingerprint has no parts (written by an earlier version) is remasked whenever it is corrected.
    """
    if detection.bounding_box is None or not is_corrected(detection, corrected_tag):
        return False
    if not _has_mask(detection):
        return True
    stored = _stored(detection)
    if stored is None:
        return False  # added by a person with the mask they drew
    if len(stored) != _WHOLE + 2 * _PART:
        return True  # an earlier fingerprint: which part changed is not known
    current = fingerprint(detection)
    box_changed = stored[_WHOLE:_WHOLE + _PART] != current[_WHOLE:_WHOLE + _PART]
    mask_changed = stored[_WHOLE + _PART:] != current[_WHOLE + _PART:]
    return box_changed and not mask_changed


def find_corrections(samples, label_field: str = core.DEFAULT_OUTPUT_FIELD,
                     corrected_tag: str = DEFAULT_CORRECTED_TAG) -> dict:
    """Tag ``corrected_tag`` the detections of ``label_field`` a person edited or added.

    Returns counts: ``num_edited`` (fingerprint no longer matches), ``num_added`` (no
    fingerprint: not written by refseg), ``num_already`` (tagged before), ``num_samples``
    (samples with at least one newly tagged detection).
    """
    core.check_detections_field(samples, label_field, "label")
    edited = added = already = touched = 0
    for sample in samples.exists(label_field).select_fields(label_field).iter_samples(autosave=True):
        changed = False
        for det in sample[label_field].detections:
            if corrected_tag in (det.tags or []):
                already += 1
                continue
            stored = _stored(det)
            if stored is None:
                added += 1
            elif not _unchanged(stored, det):
                edited += 1
            else:
                continue
            det.tags = [*(det.tags or []), corrected_tag]
            changed = True
        touched += changed
    return {"label_field": label_field, "tag": corrected_tag, "num_edited": edited, "num_added": added,
            "num_already": already, "num_samples": touched}


def _chosen(detection, only: str, corrected_tag: str, label_ids: set | None) -> bool:
    if only == "selected":
        return label_ids is not None and detection.id in label_ids
    return needs_new_mask(detection, corrected_tag)


def iter_remask_boxes(samples, *, label_field: str = core.DEFAULT_OUTPUT_FIELD, only: str = "corrected",
                      label_ids: Iterable[str] | None = None, bank_name: str | None = None,
                      models: RunSpec | None = None, device: str | None = None,
                      corrected_tag: str = DEFAULT_CORRECTED_TAG) -> Generator[core.Progress, None, dict]:
    """Give the chosen detections of ``label_field`` a new mask from the proposer's box prompt (their box kept).

    ``only="corrected"``: the corrected detections whose box has no fitting mask
    (:func:`needs_new_mask`: drawn as a box, mask removed, box moved); a mask a person
    painted or drew is kept (counted in ``num_kept``). ``only="selected"``: those whose id
    is in ``label_ids`` (the App's selected labels), whatever their mask. The models are
    the bank's (``bank_name``) when given, else ``models``, else the dataset's defaults.
    The new mask is cropped to the box (FiftyOne's layout); a remasked detection is tagged
    ``corrected_tag``, so re-labelling keeps it, and stamped again (:func:`stamp`: its
    mask is refseg's for that box, so a later box edit makes it need a new one again).
    """
    if only not in ONLY_CHOICES:
        raise ValueError(f"only must be one of {', '.join(ONLY_CHOICES)}, not {only!r}")
    ids = set(label_ids) if label_ids is not None else None
    if only == "selected" and not ids:
        raise ValueError("no label selected: select the labels to remask in the App (or pass label_ids)")
    dataset = core.fiftyone_access.root_dataset(samples)
    core.check_detections_field(samples, label_field, "box")
    if bank_name:
        models = RunSpec.from_dict(core.bank_record(dataset, bank_name)["models"])
    models = models or core.default_run_spec(dataset)
    config = models.config()
    proposer = core.load_proposer(models, core.resolve_device(device, dataset))
    view = samples.exists(label_field).select_fields(label_field)
    total = len(view)
    remasked = empty = kept = 0
    failed: list[dict] = []
    yield core.Progress(0, total, f"{total} sample(s) to look at")
    for i, sample in enumerate(view.iter_samples(autosave=True), start=1):
        chosen = [d for d in sample[label_field].detections
                  if d.bounding_box is not None and _chosen(d, only, corrected_tag, ids)]
        if only == "corrected":
            chosen_ids = {d.id for d in chosen}
            kept += sum(1 for d in sample[label_field].detections if d.id not in chosen_ids
                        and d.bounding_box is not None and is_corrected(d, corrected_tag))
        if not chosen:
            continue
        try:
            image = refseg.load_image(sample.filepath)
        except ImageLoadError as exc:
            failed.append({"sample_id": sample.id, "filepath": sample.filepath, "error": str(exc)})
            continue
        masked, unmasked = core.prompt_masks(proposer, image, chosen, config)
        for det in masked:
            if corrected_tag not in (det.tags or []):
                det.tags = [*(det.tags or []), corrected_tag]
        stamp(masked)
        remasked += len(masked)
        empty += unmasked
        yield core.Progress(i, total, f"{i}/{total} samples")
    return {"label_field": label_field, "only": only, "num_masks": remasked, "num_empty": empty,
            "num_kept": kept, "num_failed": len(failed), "failed": failed[:core.MAX_REPORTED]}


def remask_boxes(samples, progress=None, **kwargs) -> dict:
    """:func:`iter_remask_boxes` run to the end; returns its report."""
    return core.exhaust(iter_remask_boxes(samples, **kwargs), progress)


# ---------------------------------------------------------------------------- re-labelling


def _region(det: fo.Detection, height: int, width: int) -> np.ndarray:
    """The detection's full-image mask; a box-only detection counts as its filled box."""
    mask = detection_mask(det, height, width)
    if mask is not None:
        return mask
    region = np.zeros((height, width), dtype=bool)
    if det.bounding_box is not None:
        x1, y1, x2, y2 = box_to_pixels(det.bounding_box, height, width)
        region[y1:y2, x1:x2] = True
    return region


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0


def merge_with_review(old_detections: Iterable[fo.Detection], new_detections: Iterable[fo.Detection],
                      height: int, width: int, *, iou: float = core.DEFAULT_IOU,
                      review_tags: Iterable[str] = (core.DEFAULT_REJECTED_TAG, core.DEFAULT_ACCEPTED_TAG,
                                                    DEFAULT_CORRECTED_TAG),
                      corrected_tag: str = DEFAULT_CORRECTED_TAG) -> tuple[list[fo.Detection], dict]:
    """A sample's labels after re-labelling: what a person touched, then the new predictions that repeat none of it.

    Kept as they are (same ids, tags, masks): the old detections a person corrected
    (:func:`is_corrected`: edited, added, tagged ``corrected``) or reviewed (any tag in
    ``review_tags``: rejected, accepted). A new prediction whose mask overlaps a kept
    detection of the same class with IoU >= ``iou`` is dropped: the kept one stands for it,
    so an accepted or corrected instance is not doubled and a rejected one stays there,
    tagged rejected, instead of coming back untagged. A new prediction of another class at
    that place is kept (a rejected "cat" does not veto the "dog" the new bank finds there).
    Returns ``(detections, counts)`` with counts ``kept``, ``new`` and ``dropped``.
    """
    tags = set(review_tags)
    kept = [d for d in old_detections if is_corrected(d, corrected_tag) or tags & set(d.tags or [])]
    kept_regions = [(d.label, _region(d, height, width)) for d in kept]
    fresh, dropped = [], 0
    for det in new_detections:
        region = _region(det, height, width)
        if any(label == det.label and _iou(region, r) >= iou for label, r in kept_regions):
            dropped += 1
            continue
        fresh.append(det)
    return kept + fresh, {"kept": len(kept), "new": len(fresh), "dropped": dropped}

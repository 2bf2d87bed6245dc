"""Converters between FiftyOne labels and refseg's plain arrays.

FiftyOne stores an instance mask cropped to its detection's box: ``bounding_box``
is ``[x, y, w, h]`` relative to the image and ``mask`` covers exactly that box at
full image resolution. Here those crops become full ``[H, W]`` masks and back.
Pixel boxes are recovered exactly from the relative ones (:func:`pixel_xywh`), so a
mask written by :func:`to_fiftyone_detection` reads back pixel for pixel and a
reference imported from COCO gets the same box as ``refseg build-bank`` gives it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

import fiftyone as fo

import refseg
from refseg.method.results import masks_to_boxes


# How many decimals a recovered pixel coordinate may have (see _pixel_value).
_MAX_DECIMALS = 10


def _pixel_value(relative: float, size: int) -> float:
    """The pixel number ``p`` that FiftyOne stored as ``relative = p / size``, recovered exactly.

    ``relative * size`` is not always ``p`` in floating point (223 / 259 * 259 is
    222.99999999999997), and the integer truncation of reference box corners (docs/method.md
    section 1 step 1) then lands a pixel short of the one ``refseg build-bank`` uses on the
    same COCO box. FiftyOne's COCO importer stores ``x / width`` etc. with the COCO numbers
    (integers, or decimals with a few digits), so the shortest decimal (at most
    ``_MAX_DECIMALS`` digits) whose division by ``size`` gives back the stored value
    bit for bit is that number: all doubles that divide to the same value lie within
    two ulps of each other, and two distinct decimals of at most 15 significant digits are
    never that close. Any other value (a box drawn with more digits) comes back as
    ``relative * size``, off by an ulp at most. Box corners are then computed from the
    recovered numbers with the CLI's own arithmetic (``x + w``), so they match it even
    for non-integer COCO boxes.
    """
    value = relative * size
    for digits in range(_MAX_DECIMALS + 1):
        candidate = round(value, digits)
        if candidate / size == relative:
            return candidate + 0.0  # never -0.0
    return value


def pixel_xywh(bounding_box, height: int, width: int) -> tuple[float, float, float, float]:
    """FiftyOne relative ``[x, y, w, h]`` -> the pixel ``(x, y, w, h)`` it was made from (a COCO ``bbox``)."""
    x, y, w, h = (float(v) for v in bounding_box)
    return _pixel_value(x, width), _pixel_value(y, height), _pixel_value(w, width), _pixel_value(h, height)


def detection_box_pixels(detection: fo.Detection, height: int, width: int) -> tuple[float, float, float, float]:
    """A detection's box as float pixel ``(x1, y1, x2, y2)`` (reference boxes, box prompts).

    Exactly what :func:`refseg.io.coco.iter_references` makes of the COCO ``bbox`` the
    detection was imported from: ``(x, y, x + w, y + h)``.
    """
    x, y, w, h = pixel_xywh(detection.bounding_box, height, width)
    return x, y, x + w, y + h


def box_to_pixels(bounding_box, height: int, width: int) -> tuple[int, int, int, int]:
    """FiftyOne relative ``[x, y, w, h]`` -> pixel ``(x1, y1, x2, y2)``, exclusive end, clipped to the image.

    Corners are rounded as FiftyOne's COCO importer rounds them when it crops a mask to its box.
    """
    x, y, w, h = pixel_xywh(bounding_box, height, width)
    x1, y1, x2, y2 = int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h))
    return (min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height))


def detection_mask(detection: fo.Detection, height: int, width: int) -> np.ndarray | None:
    """Full-image ``[H, W]`` bool mask of a detection, or None when it has no mask.

    The stored crop is placed at the box's rounded top-left corner. A crop whose
    size disagrees with the box by more than a pixel (masks saved at another
    resolution) is resized to the box first, nearest neighbour, as FiftyOne's
    renderer does.
    """
    crop = detection.get_mask()
    if crop is None:
        return None
    crop = np.asarray(crop)
    if crop.ndim == 3:
        crop = crop[..., 0]
    crop = crop > 0
    x, y, w, h = pixel_xywh(detection.bounding_box, height, width)
    x0, y0 = int(round(x)), int(round(y))
    box_w, box_h = int(round(x + w)) - x0, int(round(y + h)) - y0
    if box_w > 0 and box_h > 0 and (abs(crop.shape[1] - box_w) > 1 or abs(crop.shape[0] - box_h) > 1):
        resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((box_w, box_h), Image.NEAREST)
        crop = np.asarray(resized) > 0
    full = np.zeros((height, width), dtype=bool)
    # clip the crop to the image (boxes may stick out by rounding or by annotation)
    ys0, xs0 = max(y0, 0), max(x0, 0)
    ys1, xs1 = min(y0 + crop.shape[0], height), min(x0 + crop.shape[1], width)
    if ys1 > ys0 and xs1 > xs0:
        full[ys0:ys1, xs0:xs1] = crop[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0]
    return full


def mask_to_crop(full_mask: np.ndarray, bounding_box) -> np.ndarray:
    """Crop a full ``[H, W]`` mask to a detection's box (FiftyOne's mask layout)."""
    h, w = full_mask.shape
    x1, y1, x2, y2 = box_to_pixels(bounding_box, h, w)
    return full_mask[y1:y2, x1:x2].copy()


def _relative_box(pixel_box, height: int, width: int) -> list[float]:
    x1, y1, x2, y2 = (int(v) for v in pixel_box)
    return [x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height]


def mask_to_bounding_box(full_mask: np.ndarray) -> list[float]:
    """Tight relative ``[x, y, w, h]`` of a non-empty ``[H, W]`` mask."""
    return _relative_box(masks_to_boxes(full_mask[None])[0], *full_mask.shape)


def to_fiftyone_detection(mask: np.ndarray, label: str, pixel_box=None, **attributes) -> fo.Detection:
    """A :class:`fiftyone.core.labels.Detection` from a non-empty full-image mask.

    Same layout as ``fo.Detection.from_mask``: the box is the mask's tight extent
    (``pixel_box`` (x1, y1, x2, y2), exclusive, when already known) and the mask is cropped to it.
    """
    box = mask_to_bounding_box(mask) if pixel_box is None else _relative_box(pixel_box, *mask.shape)
    return fo.Detection(label=label, bounding_box=box, mask=mask_to_crop(mask, box), **attributes)


def to_fiftyone_detections(dets: refseg.Detections, **container_attributes) -> fo.Detections:
    """refseg :class:`~refseg.Detections` -> ``fo.Detections``.

    Each mask's tight box and crop come from the detections' compact form
    (:attr:`~refseg.Detections.compact`): FiftyOne's layout as it is, no full mask is made.
    Empty masks are dropped (FiftyOne cannot place them); ``container_attributes``
    (e.g. the run key) are stored on the ``Detections`` object itself.
    """
    out = []
    names = dets.label_names
    compact = dets.compact
    height, width = compact.shape
    for i, box in enumerate(compact.boxes.tolist()):
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:  # an empty mask
            continue
        attrs = {"confidence": float(dets.scores[i])}
        if dets.pred_iou is not None:
            attrs["pred_iou"] = float(dets.pred_iou[i])
        out.append(fo.Detection(label=names[i], bounding_box=_relative_box(box, height, width),
                                mask=compact.crop(i), **attrs))
    return fo.Detections(detections=out, **container_attributes)

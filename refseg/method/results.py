"""The result type: per-image instance detections as plain arrays, and their COCO form."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils


@dataclass
class Detections:
    """Instances found in one image, sorted by score (highest first).

    masks:       [N, H, W] bool at the original image resolution.
    boxes:       [N, 4] float xyxy in pixels; ``x2, y2`` exclusive (the mask's true extent).
                 The paper's one-pixel-short box exists only in COCO results files
                 (:meth:`to_coco` with ``paper_box``).
    scores:      [N] float in [0, 1].
    labels:      [N] int, index into ``class_names``.
    class_names: the memory bank's class names.
    pred_iou:    [N] float, the proposer's quality estimate (kept for inspection).
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    pred_iou: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels.tolist()]

    @classmethod
    def empty(cls, height: int, width: int, class_names: list[str] | None = None) -> "Detections":
        return cls(
            masks=np.zeros((0, height, width), dtype=bool),
            boxes=np.zeros((0, 4), dtype=np.float32),
            scores=np.zeros(0, dtype=np.float32),
            labels=np.zeros(0, dtype=np.int64),
            class_names=list(class_names or []),
            pred_iou=np.zeros(0, dtype=np.float32),
        )

    def __getitem__(self, index) -> "Detections":
        """Select detections by boolean mask, index array or slice."""
        return Detections(
            masks=self.masks[index],
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            class_names=self.class_names,
            pred_iou=None if self.pred_iou is None else self.pred_iou[index],
        )

    def rles(self) -> list[dict]:
        """COCO RLE of each mask (``counts`` as str, JSON-ready)."""
        return encode_rles(self.masks)

    def to_coco(self, image_id: int, category_ids: dict[str, int] | list[int] | None = None,
                paper_box: bool = False) -> list[dict]:
        """COCO result records: ``image_id, category_id, segmentation (RLE), bbox [x, y, w, h], score``.

        ``category_ids`` maps class name (or class index, as a list) to COCO category id;
        by default the class index + 1.

        The box rule, applied here and nowhere else: ``bbox`` is the mask's exact extent
        (``w`` = last column - first column + 1), what FiftyOne labels and ``Detections.boxes``
        carry too. ``paper_box=True`` (``refseg predict`` with the ``paper`` preset only,
        :attr:`refseg.method.config.OutputConfig.paper_box`) writes the reference's box instead: from
        inclusive pixel indices, one pixel short in width and height, to reproduce the
        published box AP. The box is computed from each mask's RLE, so it does not depend on
        how ``boxes`` were made.
        """
        rles = self.rles()
        if not rles:
            return []
        bboxes = mask_utils.toBbox(rles)  # [N, 4] float64 x, y, w, h: the exact extent; zeros for an empty mask
        if paper_box:
            bboxes[:, 2:] = np.maximum(bboxes[:, 2:] - 1, 0)
        records = []
        for rle, bbox, score, label in zip(rles, bboxes.tolist(), self.scores, self.labels):
            label = int(label)
            if category_ids is None:
                cat = label + 1
            elif isinstance(category_ids, dict):
                cat = int(category_ids[self.class_names[label]])
            else:
                cat = int(category_ids[label])
            records.append(
                {
                    "image_id": int(image_id),
                    "category_id": cat,
                    "segmentation": rle,
                    "bbox": bbox,
                    "score": float(score),
                }
            )
        return records


def encode_rle(mask: np.ndarray) -> dict:
    """Binary [H, W] mask -> COCO RLE dict with ``counts`` decoded to str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_rles(masks: np.ndarray) -> list[dict]:
    """Binary [N, H, W] masks -> one COCO RLE dict each (as :func:`encode_rle`), in one pycocotools call.

    pycocotools reads [H, W, N] in column-major order, i.e. the bytes of a C-order [N, W, H]
    array: made with one blocked transpose (torch's), about twice as fast as numpy's per mask.
    """
    if len(masks) == 0:
        return []
    as_bytes = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool).view(np.uint8))
    by_column = as_bytes.transpose(1, 2).contiguous().numpy()  # [N, W, H]
    rles = mask_utils.encode(np.asfortranarray(by_column.transpose(2, 1, 0)))  # a view: no copy
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes or uncompressed list counts) -> [H, W] bool."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def masks_to_boxes(masks: np.ndarray, paper_box: bool) -> np.ndarray:
    """[N, H, W] bool -> [N, 4] xyxy float.

    ``x2, y2`` are exclusive and the box covers the mask exactly; ``paper_box=True`` gives
    the reference's inclusive ``x2, y2`` (the last mask pixel's indices, one pixel short).
    Empty masks give a zero box. Which box goes where: :meth:`Detections.to_coco`.
    """
    n = masks.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)  # [N, H]
    cols = masks.any(axis=1)  # [N, W]
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    y1 = rows.argmax(axis=1)
    y2 = h - 1 - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - 1 - cols[:, ::-1].argmax(axis=1)
    extra = 0 if paper_box else 1
    boxes[:, 0], boxes[:, 1] = x1, y1
    boxes[:, 2], boxes[:, 3] = x2 + extra, y2 + extra
    boxes[~nonempty] = 0
    return boxes

"""Simple deterministic components and synthetic data, for tests, demos and as plug-in examples.

These are real implementations of the two interfaces (no weights, no randomness):

- :class:`ColorRegionProposer` proposes each connected region of one palette colour
  (plus a slightly shrunk duplicate of it, so NMS and merging have work to do).
- :class:`GridColorProposer` is the same with a point grid's prompts (for prompt selection).
- :class:`ColorEncoder` describes each patch by its similarity to the palette colours.

:func:`make_synthetic_coco` draws images with planted coloured shapes and writes a
COCO instances file, so the whole method can be checked against known answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from refseg.method.interfaces import Proposals
from refseg.method.results import encode_rle

# Palette: background grey, the three "object" classes, two distractor colours.
PALETTE = {
    "background": (128, 128, 128),
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 220, 40),
    "magenta": (200, 50, 200),
}
CLASSES = ("red", "green", "blue")
DISTRACTORS = ("yellow", "magenta")


def _palette_tensor(device) -> torch.Tensor:
    return torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device) / 255.0  # [K, 3]


def connected_components(mask: torch.Tensor, max_iters: int = 10_000) -> torch.Tensor:
    """4-connected components of a [h, w] bool mask -> int labels (0 = outside), by label propagation."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).reshape(1, 1, h, w)
    labels = ids * mask
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool, device=mask.device)
    for _ in range(max_iters):
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack([padded[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)
                                  if cross[dy, dx]])
        new = neighbours.max(dim=0).values * mask
        if torch.equal(new, labels):
            break
        labels = new
    return labels[0, 0].long()


class ColorRegionProposer:
    """Proposes every connected region of one palette colour (deterministic stand-in for SAM2).

    Each region comes twice: as is (predicted IoU 0.95) and shrunk by one cell of the
    logit grid (predicted IoU 0.6), so duplicates exist for NMS and soft merging.
    """

    def __init__(self, device: str | torch.device = "cpu", logit_stride: int = 4, min_cells: int = 2):
        self.name = "color-regions"
        self.device = torch.device(device)
        self.logit_stride = logit_stride
        self.min_cells = min_cells

    def settings(self) -> dict:
        return {"name": self.name, "logit_stride": self.logit_stride, "min_cells": self.min_cells}

    def _quantise(self, image: torch.Tensor) -> torch.Tensor:
        """[3, S, S] -> [h, w] palette index per logit cell (by the cell's mean colour)."""
        cells = F.avg_pool2d(image[None], self.logit_stride)[0]  # [3, h, w]
        dist = ((cells.permute(1, 2, 0)[..., None, :] - _palette_tensor(image.device)) ** 2).sum(-1)
        return dist.argmin(dim=-1)

    def propose(self, images: torch.Tensor) -> list[Proposals]:
        out = []
        for image in images:
            colour = self._quantise(image.float())
            masks = []
            for k in range(1, len(PALETTE)):  # skip background
                comp = connected_components(colour == k)
                for cid in comp.unique():
                    if cid == 0:
                        continue
                    m = comp == cid
                    if int(m.sum()) >= self.min_cells:
                        masks.append(m)
            if not masks:
                out.append(Proposals.empty(colour.shape[0], image.device))
                continue
            exact = torch.stack(masks)
            shrunk = -F.max_pool2d(-exact[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
            keep_shrunk = shrunk.flatten(1).any(1)
            all_masks = torch.cat([exact, shrunk[keep_shrunk]])
            pred_iou = torch.cat([torch.full((len(exact),), 0.95), torch.full((int(keep_shrunk.sum()),), 0.6)])
            logits = torch.where(all_masks, 8.0, -8.0)
            out.append(Proposals(logits.to(image.device), pred_iou.to(image.device)))
        return out

    def masks_from_boxes(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The proposal that best fills each box (highest IoU with the box's own mask)."""
        props = self.propose(image[None])[0]
        h, w = image.shape[1:]
        gh, gw = h // self.logit_stride, w // self.logit_stride
        out = []
        for box in boxes.tolist():
            x1, y1, x2, y2 = (v / self.logit_stride for v in box)
            box_mask = torch.zeros(gh, gw, dtype=torch.bool, device=image.device)
            box_mask[int(y1):max(int(y2), int(y1) + 1), int(x1):max(int(x2), int(x1) + 1)] = True
            if len(props) == 0:
                out.append(torch.where(box_mask, 8.0, -8.0))
                continue
            m = props.logits > 0
            inter = (m & box_mask).flatten(1).sum(1).float()
            union = (m | box_mask).flatten(1).sum(1).float()
            out.append(props.logits[int((inter / union).argmax())])
        return torch.stack(out)


class GridColorProposer(ColorRegionProposer):
    """:class:`ColorRegionProposer` as if prompted by a point grid (``proposal.points_per_side`` on a side of
    the ``proposal.image_size`` frame), for prompt selection: each region is the proposal of the first grid
    point inside it (a region without one is not proposed) and a skipped prompt proposes nothing. The predicted
    IoUs are :class:`ColorRegionProposer`'s, so many proposals share one."""

    def __init__(self, device: str | torch.device = "cpu", config=None):
        from refseg.method.config import ProposalConfig
        from refseg.models.sam2_proposer import point_grid

        super().__init__(device)
        config = config or ProposalConfig(image_size=256, points_per_side=16)
        self.name = "grid-color-regions"
        self.prompt_points = point_grid(config.points_per_side, config.image_size)

    def settings(self) -> dict:
        return {**super().settings(), "prompts": int(self.prompt_points.shape[0])}

    def propose(self, images: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> list[Proposals]:
        out = []
        cells = (self.prompt_points // self.logit_stride).long()  # [P, 2] (x, y) logit cells
        for b, props in enumerate(super().propose(images)):
            inside = props.logits[:, cells[:, 1], cells[:, 0]] > 0  # [N, P]
            has, first = inside.any(1), inside.int().argmax(1)
            keep = has if prompt_mask is None else has & prompt_mask[b].to(has.device)[first]
            out.append(Proposals(props.logits[keep], props.pred_iou[keep], first[keep]))
        return out


class ColorEncoder:
    """Patch features = soft similarity of each patch's colours to the palette (stand-in for DINOv2)."""

    def __init__(self, device: str | torch.device = "cpu", input_size: int = 224, patch_size: int = 14,
                 sharpness: float = 20.0):
        self.name = "color-encoder"
        self.device = torch.device(device)
        self.input_size = input_size
        self.patch_size = patch_size
        self.dim = len(PALETTE)
        self.sharpness = sharpness

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        pix = images.float().permute(0, 2, 3, 1)  # [B, H, W, 3]
        dist = ((pix[..., None, :] - _palette_tensor(images.device)) ** 2).sum(-1)  # [B, H, W, K]
        soft = torch.softmax(-self.sharpness * dist, dim=-1).permute(0, 3, 1, 2)  # [B, K, H, W]
        feats = F.avg_pool2d(soft, self.patch_size)  # [B, K, g, g]
        return feats.permute(0, 2, 3, 1).reshape(b, feats.shape[2], feats.shape[3], self.dim)

    def settings(self) -> dict:
        return {"name": self.name, "input_size": self.input_size, "patch_size": self.patch_size, "dim": self.dim,
                "sharpness": self.sharpness}


def _random_shape(rng: np.random.Generator, height: int, width: int, min_size: int) -> np.ndarray:
    bw = int(rng.integers(min_size, max(min_size + 1, width // 3)))
    bh = int(rng.integers(min_size, max(min_size + 1, height // 3)))
    x0 = int(rng.integers(0, width - bw))
    y0 = int(rng.integers(0, height - bh))
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.5:
        draw.ellipse([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=255)
    else:
        draw.rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=255)
    return np.asarray(layer) > 0


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


def draw_scene(rng: np.random.Generator, height: int, width: int, n_objects: int,
               classes=CLASSES, distractors=DISTRACTORS, min_size: int = 24) -> tuple[np.ndarray, list[dict]]:
    """One RGB image with planted shapes; returns (image, instances with class name and final mask).

    Later shapes occlude earlier ones; instances left with too few pixels are dropped.
    """
    base = np.array(PALETTE["background"], dtype=np.float32)
    img = np.clip(base + rng.normal(0, 6, (height, width, 3)), 0, 255)
    owner = np.full((height, width), -1, dtype=np.int64)
    drawn = []
    names = list(classes) + list(distractors)
    for k in range(n_objects):
        name = names[rng.integers(len(names))] if k % 3 == 2 else classes[rng.integers(len(classes))]
        for _attempt in range(50):
            m = _random_shape(rng, height, width, min_size)
            # same-colour shapes must not touch: nothing could tell them apart
            same = np.isin(owner, [j for j, n in enumerate(drawn) if n == name])
            if not (_dilate(m, 2) & same).any():
                break
        else:
            continue
        owner[m] = len(drawn)
        colour = np.array(PALETTE[name], dtype=np.float32)
        img[m] = np.clip(colour + rng.normal(0, 6, (int(m.sum()), 3)), 0, 255)
        drawn.append(name)
    instances = []
    for k, name in enumerate(drawn):
        m = owner == k
        if m.sum() >= min_size * min_size // 4:
            instances.append({"class_name": name, "mask": m})
    return img.astype(np.uint8), instances


def make_synthetic_coco(out_dir: str | Path, n_images: int = 8, height: int = 192, width: int = 256,
                        objects_per_image: int = 4, seed: int = 0, include_distractors_in_gt: bool = False
                        ) -> tuple[Path, Path]:
    """Write PNG images and a COCO instances JSON (RLE masks) of the object classes.

    Distractor shapes are drawn but not annotated (unless asked). Returns (image_dir, json_path).
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(CLASSES) + (list(DISTRACTORS) if include_distractors_in_gt else [])
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]
    cat_ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for i in range(n_images):
        img, instances = draw_scene(rng, height, width, objects_per_image)
        fname = f"synthetic_{i:04d}.png"
        Image.fromarray(img).save(image_dir / fname)
        images.append({"id": i + 1, "file_name": fname, "height": height, "width": width})
        for inst in instances:
            if inst["class_name"] not in cat_ids:
                continue
            m = inst["mask"]
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": cat_ids[inst["class_name"]],
                "segmentation": encode_rle(m),
                "area": int(m.sum()),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "iscrowd": 0,
            })
    json_path = out_dir / "annotations.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, json_path


def coco_references(coco, image_dir: str | Path, image_ids, with_source: bool = False) -> list:
    """:class:`~refseg.Reference` of every annotation of ``image_ids`` in a pycocotools ``COCO`` of
    :func:`make_synthetic_coco` (RLE masks); ``with_source`` records each one's image file name, as
    ``refseg build-bank`` does (what leave-one-out over reference images needs)."""
    from refseg.io.images import load_image
    from refseg.method.references import Reference
    from refseg.method.results import decode_rle

    refs = []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=list(image_ids))):
        name = coco.imgs[ann["image_id"]]["file_name"]
        refs.append(Reference(load_image(Path(image_dir) / name), coco.cats[ann["category_id"]]["name"],
                              mask=decode_rle(ann["segmentation"]), **({"source": {"image": name}} if with_source
                                                                       else {})))
    return refs


def coco_bank(coco, image_dir: str | Path, image_ids, encoder, proposer, config):
    """The memory bank of :func:`coco_references` with ``config``'s reference and proposal settings."""
    from refseg.method.references import ReferenceEncoder

    refs = coco_references(coco, image_dir, image_ids)
    return ReferenceEncoder(encoder, config.reference, proposer, config.proposal.image_size).build_bank(refs)[0]


def make_train_val(root: str | Path, n_train: int, n_val: int) -> tuple[Path, Path, Path, Path]:
    """Two :func:`make_synthetic_coco` sets under ``root``: ``train`` (seed 1, where references come from) and
    ``val`` (seed 2, the targets). Returns (train images, train json, val images, val json)."""
    train_images, train_json = make_synthetic_coco(Path(root) / "train", n_images=n_train, seed=1)
    val_images, val_json = make_synthetic_coco(Path(root) / "val", n_images=n_val, seed=2)
    return train_images, train_json, val_images, val_json

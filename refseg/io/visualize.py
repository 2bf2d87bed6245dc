"""Pictures of detections: masks blended in per-class colours, box outlines and "class score" labels."""

from __future__ import annotations

import colorsys
import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from refseg.io.images import ImageLoadError, load_image
from refseg.method.results import Detections, decode_rle

MASK_ALPHA = 0.45  # weight of the class colour inside a mask
BOX_WIDTH = 2  # box outline, pixels


def class_color(name: str) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for a class name (the same in every picture and run)."""
    h = int(hashlib.md5(name.encode("utf-8")).hexdigest()[:8], 16)
    hue = (h % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_items(detections, category_names: Mapping[int, str] | None, height: int, width: int) -> list[tuple]:
    """(mask or None, xyxy box, score, class name) per detection, from Detections or COCO records."""
    items = []
    if isinstance(detections, Detections):
        for i in range(len(detections)):
            label = int(detections.labels[i])
            name = detections.class_names[label] if label < len(detections.class_names) else str(label)
            items.append((detections.masks[i], [float(v) for v in detections.boxes[i]],
                          float(detections.scores[i]), name))
        return items
    for rec in detections:
        cid = rec.get("category_id")
        name = (category_names or {}).get(int(cid), str(cid)) if cid is not None else "?"
        seg = rec.get("segmentation")
        mask = decode_rle(seg) if isinstance(seg, dict) and "counts" in seg else None
        if mask is not None and mask.shape != (height, width):
            mask = None  # results made for an image of another size: draw the box only
        if rec.get("bbox"):
            x, y, w, h = (float(v) for v in rec["bbox"])
            box = [x, y, x + w, y + h]
        elif mask is not None and mask.any():
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        else:
            continue
        items.append((mask, box, float(rec.get("score", 1.0)), name))
    return items


def render(image_rgb: np.ndarray, detections: Detections | Sequence[dict], out_path: str | os.PathLike | None = None,
           class_colors: Mapping[str, tuple[int, int, int]] | None = None, score_threshold: float = 0.0,
           category_names: Mapping[int, str] | None = None, max_detections: int | None = None) -> np.ndarray:
    """Draw detections on an RGB image; write a PNG to ``out_path`` if given; return the picture ``[H, W, 3]``.

    ``detections`` is a :class:`Detections` or a list of COCO result records (then
    ``category_names`` maps category id to name). Detections scoring below
    ``score_threshold`` are left out; at most ``max_detections`` (highest scores) are
    drawn, the best on top.
    """
    base = load_image(image_rgb)
    height, width = base.shape[:2]
    items = [it for it in _as_items(detections, category_names, height, width) if it[2] >= score_threshold]
    items.sort(key=lambda it: it[2], reverse=True)
    if max_detections is not None:
        items = items[:max_detections]
    items.reverse()  # draw low scores first so the best end up on top
    colors = dict(class_colors or {})

    canvas = base.astype(np.float32)
    for mask, _, _, name in items:
        if mask is None:
            continue
        color = np.array(colors.setdefault(name, class_color(name)), dtype=np.float32)
        canvas[mask] = canvas[mask] * (1 - MASK_ALPHA) + color * MASK_ALPHA
    picture = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for _, (x1, y1, x2, y2), score, name in items:
        color = colors.setdefault(name, class_color(name))
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=BOX_WIDTH)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        tx = min(max(0.0, x1), max(0.0, width - tw - 4))
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1  # above the box unless at the top edge
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 4], fill=color)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_color(color), font=font)
    out = np.asarray(picture)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(out_path, format="PNG")
    return out


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def render_coco_results(results: Sequence[dict], image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        images: Mapping[int, str], category_names: Mapping[int, str] | None = None,
                        max_images: int | None = 20, score_threshold: float = 0.0,
                        max_detections: int | None = None) -> list[Path]:
    """Render a COCO results list over its images; returns the PNG paths written.

    ``images`` maps image id to file name (relative to ``image_dir``). The first
    ``max_images`` images (by id) that have a detection above ``score_threshold`` are
    drawn, each to ``<out_dir>/<file name without extension>.png``. Images that cannot be read are
    skipped with a message.
    """
    by_image: dict[int, list[dict]] = {}
    for rec in results:
        if float(rec.get("score", 1.0)) >= score_threshold:
            by_image.setdefault(int(rec["image_id"]), []).append(rec)
    out_dir = Path(out_dir)
    written: list[Path] = []
    unknown = sorted(set(by_image) - set(int(i) for i in images))
    if unknown:
        print(f"refseg: warning: {len(unknown)} image id(s) in the results have no file name, e.g. {unknown[:5]}")
    for image_id in sorted(i for i in by_image if i in images):
        if max_images is not None and len(written) >= max_images:
            break
        file_name = images[image_id]
        try:
            rgb = load_image(Path(image_dir) / file_name)
        except ImageLoadError as exc:  # one bad picture must not stop the rest
            print(f"refseg: warning: skipped image {image_id}: {exc}")
            continue
        target = out_dir / (str(Path(file_name).with_suffix("")).replace(os.sep, "__").replace("/", "__") + ".png")
        render(rgb, by_image[image_id], target, score_threshold=score_threshold, category_names=category_names,
               max_detections=max_detections)
        written.append(target)
    return written

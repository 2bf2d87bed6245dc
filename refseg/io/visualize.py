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
from refseg.method.results import Detections

MASK_ALPHA = 0.45  # weight of the class colour inside a mask
BOX_WIDTH = 2  # box outline, pixels
_NO_CATEGORY = -1  # stands for a record's missing category_id (drawn as "?")


def class_color(name: str) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for a class name (the same in every picture and run)."""
    h = int(hashlib.md5(name.encode("utf-8")).hexdigest()[:8], 16)
    hue = (h % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_detections(detections, category_names: Mapping[int, str] | None, height: int, width: int) -> Detections:
    """Detections as they are, or COCO result records of one image as :class:`Detections`
    (:meth:`Detections.from_coco`; a category without a name is shown by its id, a missing one as "?")."""
    if isinstance(detections, Detections):
        return detections
    records = []
    for rec in detections:
        seg = rec.get("segmentation")
        if isinstance(seg, dict) and [int(v) for v in seg.get("size", (height, width))] != [height, width]:
            seg = None  # results made for an image of another size: draw the box only
        elif not (isinstance(seg, dict) and "counts" in seg or isinstance(seg, list) and seg):
            seg = None
        if seg is None and not rec.get("bbox"):
            continue  # nothing to draw
        records.append({**rec, "segmentation": seg, "category_id": _NO_CATEGORY if rec.get("category_id") is None else rec["category_id"]})
    ids = sorted({int(r["category_id"]) for r in records})
    names = {**(category_names or {}), _NO_CATEGORY: "?"}
    return Detections.from_coco(records, height, width, [names.get(i, str(i)) for i in ids], ids)


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
    dets = _as_detections(detections, category_names, height, width)
    same_size = dets.image_size == (height, width)  # else: boxes only
    order = [i for i in np.argsort(-dets.scores, kind="stable").tolist() if dets.scores[i] >= score_threshold]
    if max_detections is not None:
        order = order[:max_detections]
    order.reverse()  # draw low scores first so the best end up on top
    colors = dict(class_colors or {})
    names = dets.label_names

    canvas = base.astype(np.float32)
    compact = dets.compact if same_size else None
    for i in order if same_size else []:
        x1, y1, x2, y2 = compact.boxes[i].tolist()
        if x2 <= x1:
            continue
        color = np.array(colors.setdefault(names[i], class_color(names[i])), dtype=np.float32)
        window = canvas[y1:y2, x1:x2]
        crop = compact.crop(i)
        window[crop] = window[crop] * (1 - MASK_ALPHA) + color * MASK_ALPHA
    picture = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in dets.boxes[i])
        name, score = names[i], float(dets.scores[i])
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

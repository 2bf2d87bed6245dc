"""COCO adapters: few-shot reference sampling, loading references, and COCOeval.

Everything here works on any COCO instances file (a path or the parsed dict):

- :func:`sample_few_shot` draws the N-shot reference set exactly as the paper did
  (docs/method.md section 1, "Paper mode sampling") and returns it as a COCO dict.
- :func:`load_references` / :func:`iter_references` turn annotations into
  :class:`refseg.Reference` objects (polygon, RLE or box-only), collecting unusable
  ones with a reason instead of failing.
- :func:`evaluate` runs pycocotools' COCOeval on a class subset.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from refseg.errors import CocoError
from refseg.io.images import ImageLoadError, load_image
from refseg.method.references import Reference, box_problem
from refseg.method.results import annotation_mask

# The 20 PASCAL VOC classes under their COCO names (the COCO-FSOD "novel" classes).
VOC_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "boat", "bird", "cat", "dog", "horse",
    "sheep", "cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv",
)

CLASS_SETS: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES}

STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class SamplingError(CocoError):
    """The reference set cannot be drawn as asked (too few valid instances, bad input)."""


@dataclass(frozen=True)
class SamplingRules:
    """Which annotations may serve as references (paper values)."""

    min_size: float = 32  # box width and height at least this many pixels
    border: float = 10  # box at least this many pixels from every image border


# ---------------------------------------------------------------------------- reading COCO files


def _read_json(source: str | os.PathLike, what: str):
    """Parse a JSON file; a missing file or bad JSON is a clear error naming ``what`` and the path."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CocoError(f"{path} is not valid JSON: {exc}") from exc


def read_coco(source: str | os.PathLike | dict, *, require_file_names: bool = False) -> dict:
    """A COCO dict from a path or a dict (returned as is); clear errors for missing or malformed files.

    The records are checked (:class:`ValueError` naming the file and the record):
    every image has an integer ``id`` (no id twice), every annotation is an object
    with an integer ``category_id`` and ``image_id`` (and a ``bbox`` of four numbers
    when it has one), every category an integer ``id`` (no id twice) and a ``name``.
    ``categories`` may be absent. With ``require_file_names`` every image must have a
    ``file_name`` (target images); otherwise an image without one is only unusable
    itself (see :func:`iter_references`).
    """
    if isinstance(source, dict):
        data = source
        name = "COCO dict"
    else:
        data = _read_json(source, "COCO file")
        name = str(Path(source))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations", []), list):
        raise CocoError(f"{name} is not a COCO instances file (expected a dict with 'images' and 'annotations')")
    _check_records(data, name, require_file_names)
    return data


def target_images(coco: str | os.PathLike | dict) -> list[tuple[int, str]]:
    """``(image id, file_name)`` of every image of a COCO file, in file order: the targets to label.

    Every image needs an integer ``id`` (no id twice) and a ``file_name``; a file
    without ``categories`` is fine. Errors are :class:`ValueError` naming the record.
    """
    data = read_coco(coco, require_file_names=True)
    return [(int(_as_int(im["id"])), str(im["file_name"])) for im in data["images"]]  # type: ignore[arg-type]


def _as_int(value) -> int | None:
    """``value`` as a COCO id (an integer, an integral float or a string of digits), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _fast_box(bbox) -> bool:
    """A list of four finite numbers (quick check; ``False`` sends the record to the careful one)."""
    try:
        return type(bbox) is list and len(bbox) == 4 and math.isfinite(bbox[0] + bbox[1] + bbox[2] + bbox[3])
    except TypeError:
        return False


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _duplicates(ids: list[int]) -> list[int]:
    seen: set[int] = set()
    dup: dict[int, None] = {}
    for i in ids:
        if i in seen:
            dup[i] = None
        seen.add(i)
    return list(dup)


def _shown(values: list, limit: int = 10) -> str:
    return ", ".join(map(str, values[:limit])) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _check_records(data: dict, name: str, require_file_names: bool = False) -> None:
    """Raise :class:`ValueError` naming the first malformed record of a COCO dict (see :func:`read_coco`)."""
    image_ids: list[int] = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise CocoError(f"{name}: images[{i}] is {_kind(im)}, not an image record")
        file_name = im.get("file_name")
        where = f"images[{i}]" + (f" (file_name {file_name!r})" if file_name else "")
        if "id" not in im:
            raise CocoError(f"{name}: {where} has no 'id'")
        iid = _as_int(im["id"])
        if iid is None:
            raise CocoError(f"{name}: {where} has a non-integer id {im['id']!r}")
        if file_name is not None and not isinstance(file_name, str):
            raise CocoError(f"{name}: image {iid} ({where}) has a file_name that is {_kind(file_name)}, "
                             f"not a string")
        if require_file_names and not file_name:
            raise CocoError(f"{name}: image {iid} ({where}) has no 'file_name'")
        for key in ("width", "height"):
            if im.get(key) is not None and not ((v := _as_int(im[key])) is not None and v >= 1):
                raise CocoError(f"{name}: image {iid} ({where}) has a {key} that is not a positive integer: "
                                 f"{im[key]!r}")
        image_ids.append(iid)
    dup = _duplicates(image_ids)
    if dup:
        raise CocoError(f"{name}: duplicate image id(s) {_shown(dup)} (each image needs its own id)")

    for i, ann in enumerate(data.get("annotations", [])):
        # fast path (every record of a well-formed file): plain ints and a list of four finite numbers
        if type(ann) is dict and type(ann.get("category_id")) is int and type(ann.get("image_id")) is int:
            bbox = ann.get("bbox")
            if bbox is None or _fast_box(bbox):
                continue
        if not isinstance(ann, dict):
            raise CocoError(f"{name}: annotations[{i}] is {_kind(ann)}, not an annotation record")
        where = f"annotations[{i}]" + (f" (id {ann['id']})" if ann.get("id") is not None else "")
        for key in ("category_id", "image_id"):
            if key not in ann:
                raise CocoError(f"{name}: {where} has no '{key}'")
            if _as_int(ann[key]) is None:
                raise CocoError(f"{name}: {where} has a non-integer {key} {ann[key]!r}")
        bbox = ann.get("bbox")
        if bbox is not None and bbox != [] and not (
                isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise CocoError(f"{name}: {where} has a bbox that is not four finite numbers [x, y, w, h]: {bbox!r}")

    categories = data.get("categories", [])
    if categories is None:
        categories = []
    if not isinstance(categories, list):
        raise CocoError(f"{name}: 'categories' is {_kind(categories)}, not a list")
    cat_ids: list[int] = []
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict):
            raise CocoError(f"{name}: categories[{i}] is {_kind(cat)}, not a category record")
        label = cat.get("name")
        where = f"categories[{i}]" + (f" (name {label!r})" if label is not None else "")
        if "id" not in cat:
            raise CocoError(f"{name}: {where} has no 'id'")
        cid = _as_int(cat["id"])
        if cid is None:
            raise CocoError(f"{name}: {where} has a non-integer id {cat['id']!r}")
        if label is None or not isinstance(label, (str, int, float)) or isinstance(label, bool) or str(label) == "":
            raise CocoError(f"{name}: category {cid} ({where}) has no 'name'" if label is None else
                             f"{name}: category {cid} ({where}) has an unusable name {label!r}")
        cat_ids.append(cid)
    dup = _duplicates(cat_ids)
    if dup:
        raise CocoError(f"{name}: duplicate category id(s) {_shown(dup)}")


def box_prompts(coco: str | os.PathLike | dict, categories: str | Sequence[str | int] | None = None) -> list[dict]:
    """The annotations :func:`iter_references` will hand over as box-only references (no segmentation, a usable
    box: see :func:`refseg.method.references.box_problem`, with the image size the file gives), i.e. those that need
    the proposal model. An empty list means building the bank needs no proposal model."""
    data = read_coco(coco)
    wanted = resolve_classes(categories, data)
    images = {int(_as_int(im["id"])): im for im in data["images"]}  # type: ignore[arg-type]
    out = []
    for ann in data.get("annotations", []):
        if wanted is not None and int(ann["category_id"]) not in wanted:
            continue
        if ann.get("segmentation"):
            continue
        info = images.get(int(ann["image_id"]))
        if info is None or not info.get("file_name"):
            continue
        if _annotation_box_problem(ann, info) is None:
            out.append(ann)
    return out


def _annotation_box_problem(ann: dict, info: dict | None, height: int | None = None,
                            width: int | None = None) -> str | None:
    """Why a box-only annotation's ``bbox`` (COCO xywh) cannot prompt a mask, or ``None``."""
    bbox = ann.get("bbox")
    if not bbox or len(bbox) != 4:
        return "it has no bbox"
    x, y, w, h = (float(v) for v in bbox)
    if height is None and info is not None and info.get("height") is not None and info.get("width") is not None:
        height, width = int(info["height"]), int(info["width"])
    return box_problem((x, y, x + w, y + h), height, width)


def category_names(coco: dict) -> dict[int, str]:
    """Category id -> name (an empty dict for a file without ``categories``)."""
    return {int(c["id"]): str(c["name"]) for c in coco.get("categories") or []}


def resolve_classes(spec: str | Sequence[str | int] | None, coco: dict) -> list[int] | None:
    """Category ids named by ``spec``: ``None`` (all), a set name (``"voc"``), a comma list of names or ids.

    Names are matched exactly first, then case-insensitively. Unknown names raise
    :class:`ValueError` with the closest known ones.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.strip().lower()
        items: list[str | int] = list(CLASS_SETS[key]) if key in CLASS_SETS else \
            [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    if not items:
        raise CocoError("empty class list")
    names = category_names(coco)
    by_name = {n: i for i, n in names.items()}
    by_lower = {n.lower(): i for i, n in names.items()}
    ids: list[int] = []
    unknown: list[str] = []
    for item in items:
        if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.isdigit() and item not in by_name):
            cid = int(item)
            if cid not in names:
                unknown.append(str(item))
                continue
        elif item in by_name:
            cid = by_name[item]
        elif str(item).lower() in by_lower:
            cid = by_lower[str(item).lower()]
        else:
            unknown.append(str(item))
            continue
        if cid not in ids:
            ids.append(cid)
    if unknown:
        known = ", ".join(names.values()) if len(names) <= 30 else f"{len(names)} categories"
        if isinstance(spec, str) and spec.strip().lower() in CLASS_SETS:
            shown = ", ".join(map(repr, unknown[:5])) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise CocoError(f"{len(unknown)} of the {len(items)} {spec.strip().lower()!r} classes are not in the file "
                             f"({shown}); the file has: {known}")
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, list(by_name), n=3)
            hints.append(f"{u!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise CocoError(f"unknown class(es) {', '.join(hints)}; the file has: {known}")
    return ids


# ---------------------------------------------------------------------------- sampling


def _is_valid(ann: dict, image: dict, rules: SamplingRules) -> bool:
    if ann.get("iscrowd", 0):
        return False
    bbox = ann.get("bbox")
    if not bbox or len(bbox) != 4:
        return False
    x, y, w, h = (float(v) for v in bbox)
    if w < rules.min_size or h < rules.min_size:
        return False
    width, height = float(image["width"]), float(image["height"])
    b = rules.border
    return x >= b and y >= b and x + w <= width - b and y + h <= height - b


def sample_few_shot(coco: str | os.PathLike | dict, shots: int, seed: int = 33,
                    categories: str | Sequence[str | int] | None = None, min_size: float = 32,
                    border: float = 10, allow_fewer: bool = False) -> dict:
    """Draw an N-shot reference set (N distinct images per class, one instance each), as the paper did.

    One ``random.Random(seed)`` (the same sequence as ``random.seed(seed)`` followed by
    ``random.shuffle``) serves every category, taken in order of first appearance in
    the annotation list. Per category its annotations, in file order, are shuffled and
    walked; an annotation is accepted if its image is not yet used for this class and
    it is valid: not crowd, box width and height >= ``min_size``, box at least
    ``border`` px from every image border. The first ``shots`` accepted ones are kept.

    Every category of the file is shuffled, in that order, whatever ``categories``
    selects, so a class gets the same references whether it is sampled alone or with
    all others. Fewer than ``shots`` valid instances of a selected class raise
    :class:`SamplingError` unless ``allow_fewer`` (then a warning, and what exists is taken).

    Returns a COCO dict (``images``, ``annotations``, ``categories``) of the reference set.
    """
    if int(shots) < 1:
        raise SamplingError(f"shots must be at least 1, got {shots}")
    data = read_coco(coco)
    rules = SamplingRules(min_size=min_size, border=border)
    images = {int(im["id"]): im for im in data["images"]}
    wanted = resolve_classes(categories, data)
    names = category_names(data)

    per_category: dict[int, list[dict]] = {}  # insertion order = first appearance
    for ann in data["annotations"]:
        per_category.setdefault(int(ann["category_id"]), []).append(ann)

    rng = random.Random(seed)
    chosen: dict[int, list[dict]] = {}
    counts: dict[int, tuple[int, int]] = {}  # category -> (valid distinct images, annotations)
    for cid, anns in per_category.items():
        pool = list(anns)
        rng.shuffle(pool)
        if wanted is not None and cid not in wanted:
            continue
        used_images: set[int] = set()
        picked: list[dict] = []
        for ann in pool:
            image_id = int(ann["image_id"])
            if image_id in used_images:
                continue
            image = images.get(image_id)
            if image is None:
                raise SamplingError(f"annotation {ann.get('id')} refers to image {image_id}, which is not in the file")
            if "width" not in image or "height" not in image:
                raise SamplingError(f"image {image_id} has no width/height in the file: the border rule needs them")
            if not _is_valid(ann, image, rules):
                continue
            used_images.add(image_id)
            picked.append(ann)
            if len(picked) == shots:
                break
        chosen[cid] = picked
        counts[cid] = (len(picked), len(anns))

    selected = wanted if wanted is not None else list(per_category)
    missing = [cid for cid in selected if cid not in per_category]
    short = [cid for cid in selected if cid in chosen and len(chosen[cid]) < shots] + missing
    if short:
        detail = "; ".join(
            f"{names.get(cid, cid)!r}: {counts.get(cid, (0, 0))[0]} valid of {counts.get(cid, (0, 0))[1]} annotations"
            for cid in short)
        message = (f"fewer than {shots} valid reference instances (distinct images, not crowd, box >= {min_size}px, "
                   f">= {border}px from the borders) for {len(short)} class(es): {detail}")
        if not allow_fewer:
            raise SamplingError(message + ". Use allow_fewer / --allow-fewer to take what exists.")
        warnings.warn(message + "; taking what exists.", stacklevel=2)

    out_images: list[dict] = []
    seen: set[int] = set()
    out_annotations: list[dict] = []
    for cid in selected:
        for ann in chosen.get(cid, []):
            out_annotations.append(copy.deepcopy(ann))
            image_id = int(ann["image_id"])
            if image_id not in seen:
                seen.add(image_id)
                out_images.append(copy.deepcopy(images[image_id]))
    cats = {int(c["id"]): c for c in data.get("categories") or []}
    out_categories = [copy.deepcopy(cats.get(cid, {"id": cid, "name": str(cid)})) for cid in selected]
    return {
        "info": {
            "description": f"refseg {shots}-shot reference set",
            "sampling": {"shots": int(shots), "seed": seed, "min_size": min_size, "border": border,
                         "allow_fewer": allow_fewer},
        },
        "images": out_images,
        "annotations": out_annotations,
        "categories": out_categories,
    }


# ---------------------------------------------------------------------------- references


class ReferenceList(list):
    """A list of :class:`Reference` with ``skipped``: (source, class name, reason) of unusable annotations."""

    def __init__(self, items: Iterable[Reference] = (), skipped: list[tuple[dict, str, str]] | None = None):
        super().__init__(items)
        self.skipped: list[tuple[dict, str, str]] = skipped if skipped is not None else []


def iter_references(coco: str | os.PathLike | dict, image_dir: str | os.PathLike,
                    skipped: list[tuple[dict, str, str]] | None = None,
                    categories: str | Sequence[str | int] | None = None) -> Iterator[Reference]:
    """Yield one :class:`Reference` per annotation (all instances of every image), lazily.

    Masks come from polygons, RLE or uncompressed RLE; an annotation without a
    segmentation gives ``Reference(mask=None, box=xyxy)`` (the bank builder turns the
    box into a mask). Each image is read once for all its annotations. Annotations
    that cannot be used (missing or corrupt image, bad segmentation) are appended to
    ``skipped`` as ``(source, class name, reason)`` instead of raising.
    """
    data = read_coco(coco)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    skipped = skipped if skipped is not None else []
    names = category_names(data)
    wanted = resolve_classes(categories, data)
    images = {int(im["id"]): im for im in data["images"]}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if wanted is not None and int(ann["category_id"]) not in wanted:
            continue
        by_image.setdefault(int(ann["image_id"]), []).append(ann)

    for image_id, anns in by_image.items():
        info = images.get(image_id)
        file_name = str(info.get("file_name", "")) if info else ""
        sources = [{"image": file_name, "image_id": image_id, "annotation_id": a.get("id")} for a in anns]
        classes = [names.get(int(a["category_id"]), str(a["category_id"])) for a in anns]
        if info is None or not file_name:
            reason = "image not listed in the file" if info is None else "image has no file_name"
            skipped.extend((s, c, reason) for s, c in zip(sources, classes))
            continue
        try:
            rgb = load_image(image_dir / file_name)
        except ImageLoadError as exc:
            skipped.extend((s, c, str(exc)) for s, c in zip(sources, classes))
            continue
        h, w = rgb.shape[:2]
        if ("height" in info and int(info["height"]) != h) or ("width" in info and int(info["width"]) != w):
            reason = f"image is {w}x{h} but the file says {info.get('width')}x{info.get('height')}"
            skipped.extend((s, c, reason) for s, c in zip(sources, classes))
            continue
        for ann, source, class_name in zip(anns, sources, classes):
            try:
                mask = annotation_mask(ann.get("segmentation"), h, w)
            except (ValueError, TypeError) as exc:
                skipped.append((source, class_name, f"bad segmentation: {exc}"))
                continue
            box = None
            bbox = ann.get("bbox")
            if bbox and len(bbox) == 4:
                x, y, bw, bh = (float(v) for v in bbox)
                box = (x, y, x + bw, y + bh)
            if mask is None:
                problem = _annotation_box_problem(ann, info, h, w)
                if problem is not None:
                    skipped.append((source, class_name, f"annotation has no segmentation and no usable box: "
                                                        f"{problem}"))
                    continue
            yield Reference(image=rgb, class_name=class_name, mask=mask, box=box, source=source)


def load_references(coco: str | os.PathLike | dict, image_dir: str | os.PathLike,
                    categories: str | Sequence[str | int] | None = None) -> ReferenceList:
    """Every annotation of a COCO file as a :class:`Reference` (see :func:`iter_references`).

    Returns a list whose ``skipped`` attribute holds ``(source, class name, reason)``
    for annotations that could not be loaded (missing or corrupt image...).
    """
    skipped: list[tuple[dict, str, str]] = []
    refs = ReferenceList(iter_references(coco, image_dir, skipped, categories), skipped)
    return refs


# ---------------------------------------------------------------------------- evaluation


def _coco_api(data: dict):
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = copy.deepcopy(data)
    for key in ("annotations", "categories"):
        if api.dataset.get(key) is None:
            api.dataset[key] = []
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def read_results(results: str | os.PathLike | list) -> list[dict]:
    """COCO result records from a path or a list.

    Every record must be an object with an integer ``image_id`` and ``category_id``
    and a finite ``score`` (:class:`ValueError` naming the record otherwise).
    """
    if isinstance(results, list):
        data, name = results, "results list"
    else:
        data = _read_json(results, "results file")
        name = str(Path(results))
        if not isinstance(data, list):
            raise CocoError(f"{name} is not a COCO results file (expected a JSON list of detections)")
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise CocoError(f"{name}: detection [{i}] is {_kind(r)}, not a result record")
        for key in ("image_id", "category_id"):
            if key not in r:
                raise CocoError(f"{name}: detection [{i}] has no '{key}'")
            if _as_int(r[key]) is None:
                raise CocoError(f"{name}: detection [{i}] has a non-integer {key} {r[key]!r}")
        if not _is_number(r.get("score")):
            raise CocoError(f"{name}: detection [{i}] has no finite 'score'" if "score" not in r else
                             f"{name}: detection [{i}] has a score that is not a finite number: {r['score']!r}")
    return data


def evaluate(gt: str | os.PathLike | dict, results: str | os.PathLike | list,
             iou_types: Sequence[str] = ("bbox", "segm"), classes: str | Sequence[str | int] | None = None,
             image_ids: Sequence[int] | None = None, verbose: bool = True) -> dict[str, dict]:
    """COCO AP of ``results`` against ground truth ``gt`` with pycocotools' COCOeval.

    ``classes`` restricts ground truth and results to a class subset (``"voc"``, names
    or ids); ``image_ids`` to some images (default: every ground-truth image, including
    those without detections). Results on images not in the ground truth are dropped
    with a warning. For ``segm`` the boxes are removed from the results so that the
    size ranges use mask areas (as detectron2 does). Prints the standard table unless
    ``verbose`` is false; returns ``{iou_type: {"AP": ..., "AP50": ..., ...}}``
    (fractions in [0, 1]; -1 where a size range has no ground truth) plus
    ``"per_class_AP"``: ``{class name: AP}``.
    """
    from pycocotools.cocoeval import COCOeval

    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise CocoError(f"unknown IoU type {t!r}; use bbox and/or segm")
    gt_data = read_coco(gt)
    records = read_results(results)
    gt_api = _coco_api(gt_data)
    cat_ids = resolve_classes(classes, gt_data)
    if cat_ids is None:
        cat_ids = sorted(category_names(gt_data))
    gt_images = set(gt_api.getImgIds())
    img_ids = sorted(gt_images) if image_ids is None else [int(i) for i in image_ids]
    unknown_ids = [i for i in img_ids if i not in gt_images]
    if unknown_ids:
        raise CocoError(f"{len(unknown_ids)} requested image id(s) are not in the ground truth, e.g. {unknown_ids[:5]}")

    outside = [r for r in records if int(r["image_id"]) not in gt_images]
    if outside:
        warnings.warn(f"{len(outside)} detection(s) on {len({r['image_id'] for r in outside})} image(s) that are not "
                      f"in the ground truth were ignored", stacklevel=2)
    records = [r for r in records if int(r["image_id"]) in gt_images]
    out: dict[str, dict] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in records if r.get("segmentation")]
        else:
            dets = [dict(r) for r in records if r.get("bbox")]
        if not dets:
            message = (f"[{iou_type}] no detections to evaluate" +
                       (" (the results hold no masks)" if records and iou_type == "segm" else "") + ": AP is 0")
            if verbose:
                print(message)
            out[iou_type] = {**{name: 0.0 for name in STAT_NAMES}, "per_class_AP": {}}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt_api = gt_api.loadRes(dets)
        evaluator = COCOeval(gt_api, dt_api, iou_type)
        evaluator.params.catIds = list(cat_ids)
        evaluator.params.imgIds = img_ids
        table = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.redirect_stdout(table):
            evaluator.summarize()
        if verbose:
            print(f"\n[{iou_type}] {len(cat_ids)} class(es), {len(img_ids)} image(s), {len(dets)} detection(s)")
            print(table.getvalue(), end="")
        stats: dict = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
        stats["per_class_AP"] = _per_class_ap(evaluator, gt_api)
        out[iou_type] = stats
    return out


def _per_class_ap(evaluator, gt_api) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) per category name; -1 for no ground truth."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    out = {}
    for k, cid in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = gt_api.cats[cid]["name"] if cid in gt_api.cats else str(cid)
        out[name] = float(p.mean()) if p.size else -1.0
    return out

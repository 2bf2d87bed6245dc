"""COCO adapters: paper-mode sampling, loading references, COCOeval."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.io.coco import (
    VOC_CLASSES, SamplingError, evaluate, load_references, resolve_classes, sample_few_shot,
)
from refseg.method.results import encode_rle
from refseg.testing import make_synthetic_coco


def tiny_coco() -> dict:
    """Hand-built file: validity of each annotation is known (see comments)."""
    images = [
        {"id": 1, "file_name": "a.png", "width": 200, "height": 200},
        {"id": 2, "file_name": "b.png", "width": 200, "height": 200},
        {"id": 3, "file_name": "c.png", "width": 200, "height": 200},
        {"id": 4, "file_name": "d.png", "width": 100, "height": 100},
    ]
    A = lambda i, img, cat, box, crowd=0: {"id": i, "image_id": img, "category_id": cat, "bbox": box,  # noqa: E731
                                           "area": box[2] * box[3], "iscrowd": crowd}
    annotations = [
        A(10, 1, 2, [20, 20, 50, 50]),  # dog, valid (dog appears first: sampled first)
        A(11, 1, 1, [20, 20, 50, 50]),  # cat, valid
        A(12, 1, 1, [100, 100, 60, 60]),  # cat, valid, same image as 11
        A(13, 2, 1, [20, 20, 40, 40], crowd=1),  # cat, crowd
        A(14, 2, 1, [20, 20, 31, 40]),  # cat, too narrow (31 < 32)
        A(15, 3, 1, [5, 20, 50, 50]),  # cat, 5 px from the left border
        A(16, 3, 1, [20, 20, 50, 50]),  # cat, valid
        A(17, 4, 1, [58, 58, 32, 32]),  # cat, valid: exactly 10 px from the right and bottom borders
        A(18, 2, 2, [20, 20, 40, 40]),  # dog, valid
        A(19, 4, 2, [59, 10, 32, 32]),  # dog, 9 px from the right border
        A(20, 4, 2, [10, 10, 32, 32]),  # dog, valid
    ]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return {"images": images, "annotations": annotations, "categories": categories}


VALID = {10, 11, 12, 16, 17, 18, 20}


def reference_sampling(coco: dict, shots: int, seed: int) -> dict[int, list[int]]:
    """Independent re-implementation with the module-level random state, as the paper's code does."""
    random.seed(seed)
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    order, pairs = [], {}
    for ann in coco["annotations"]:
        if ann["category_id"] not in pairs:
            order.append(ann["category_id"])
            pairs[ann["category_id"]] = []
        pairs[ann["category_id"]].append((ann["image_id"], ann))
    out = {}
    for cid in order:
        lst = pairs[cid]
        random.shuffle(lst)
        used, picked = set(), []
        for img, ann in lst:
            x, y, w, h = ann["bbox"]
            W, H = sizes[img]
            ok = not ann["iscrowd"] and w >= 32 and h >= 32 and x >= 10 and y >= 10 and x + w <= W - 10 \
                and y + h <= H - 10
            if img in used or not ok:
                continue
            used.add(img)
            picked.append(ann["id"])
            if len(picked) == shots:
                break
        out[cid] = picked
    return out


def picked(refs: dict) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ann in refs["annotations"]:
        out.setdefault(ann["category_id"], []).append(ann["id"])
    return out


@pytest.mark.parametrize("seed", [33, 0, 1, 7, 2024])
@pytest.mark.parametrize("shots", [1, 2, 3])
def test_sampling_matches_module_level_random(seed, shots):
    coco = tiny_coco()
    refs = sample_few_shot(coco, shots, seed=seed)
    expected = reference_sampling(tiny_coco(), shots, seed)
    assert picked(refs) == expected
    for cid, ids in picked(refs).items():
        assert len(ids) == shots
        assert set(ids) <= VALID
        images = [next(a["image_id"] for a in coco["annotations"] if a["id"] == i) for i in ids]
        assert len(set(images)) == len(images)  # one image per class, never reused
    # output is a COCO file of the reference set: every referenced image listed once
    image_ids = [im["id"] for im in refs["images"]]
    assert len(image_ids) == len(set(image_ids))
    assert {a["image_id"] for a in refs["annotations"]} == set(image_ids)
    assert [c["name"] for c in refs["categories"]] == ["dog", "cat"]  # first appearance


def test_sampling_by_hand():
    coco = tiny_coco()
    # cat's valid instances live on images 1 (two of them), 3 and 4; dog's on 1, 2 and 4
    refs = sample_few_shot(coco, 3, seed=33)
    got = picked(refs)
    assert set(got[2]) == {10, 18, 20}
    assert {16, 17} <= set(got[1]) and len(set(got[1]) & {11, 12}) == 1


def test_subset_gets_the_same_references():
    full = picked(sample_few_shot(tiny_coco(), 2, seed=5))
    only_cat = sample_few_shot(tiny_coco(), 2, seed=5, categories="cat")
    assert picked(only_cat) == {1: full[1]}
    assert [c["name"] for c in only_cat["categories"]] == ["cat"]


def test_fewer_than_n_is_an_error_naming_the_class():
    with pytest.raises(SamplingError, match=r"'cat': 3 valid of 7 annotations"):
        sample_few_shot(tiny_coco(), 4, seed=33)
    with pytest.warns(UserWarning, match="cat"):
        refs = sample_few_shot(tiny_coco(), 4, seed=33, allow_fewer=True)
    assert len(picked(refs)[1]) == 3 and len(picked(refs)[2]) == 3


def test_sampling_reads_a_path(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_coco()))
    assert sample_few_shot(path, 2) == sample_few_shot(tiny_coco(), 2)


def test_resolve_classes():
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)]
            + [{"id": 99, "name": "giraffe"}]}
    assert resolve_classes("voc", coco) == list(range(1, 21))
    assert resolve_classes("dog, giraffe", coco) == [11, 99]
    assert resolve_classes("99,Dog", coco) == [99, 11]
    assert resolve_classes(None, coco) is None
    with pytest.raises(ValueError, match="giraffee.*did you mean 'giraffe'"):
        resolve_classes("giraffee", coco)


# ---------------------------------------------------------------------------- load_references


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_load_references(tmp_path):
    h, w = 30, 40
    for name in ("p.png", "q.png"):
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    rle_mask = np.zeros((h, w), bool)
    rle_mask[3:9, 20:33] = True
    raw_mask = np.zeros((h, w), bool)
    raw_mask[10:25, 2:6] = True
    raw_mask[12, 10] = True
    coco = {
        "images": [{"id": 1, "file_name": "p.png", "height": h, "width": w},
                   {"id": 2, "file_name": "q.png", "height": h, "width": w},
                   {"id": 3, "file_name": "missing.png", "height": h, "width": w},
                   {"id": 4, "file_name": "bad.png", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]],
             "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": encode_rle(rle_mask),
             "bbox": [20, 3, 13, 6], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "segmentation": uncompressed_rle(raw_mask),
             "bbox": [2, 10, 9, 15], "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [1.5, 2, 10, 20], "iscrowd": 0},
            {"id": 5, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 6, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        ],
    }
    refs = load_references(coco, tmp_path)
    by_ann = {r.source["annotation_id"]: r for r in refs}
    assert sorted(by_ann) == [1, 2, 3, 4]  # both instances of p.png
    poly = by_ann[1].mask
    assert poly.shape == (h, w) and poly[10, 10] and not poly[0, 0] and not poly[20, 10]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[5, 5, 15, 5, 15, 15, 5, 15]], h, w)))
    assert np.array_equal(poly, expected.astype(bool))
    assert np.array_equal(by_ann[2].mask, rle_mask)
    assert np.array_equal(by_ann[3].mask, raw_mask)
    assert by_ann[4].mask is None and tuple(by_ann[4].box) == (1.5, 2.0, 11.5, 22.0)
    assert tuple(by_ann[2].box) == (20.0, 3.0, 33.0, 9.0)
    assert by_ann[1].class_name == "a" and by_ann[2].class_name == "b"
    assert by_ann[2].source == {"image": "p.png", "image_id": 1, "annotation_id": 2}
    assert by_ann[1].image is by_ann[2].image  # each image read once
    reasons = {s["annotation_id"]: (c, r) for s, c, r in refs.skipped}
    assert set(reasons) == {5, 6}
    assert "not found" in reasons[5][1] and reasons[5][0] == "b"
    assert "bad.png" in reasons[6][1]


# ---------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    _, json_path = make_synthetic_coco(tmp_path_factory.mktemp("syn"), n_images=4, seed=3)
    return json_path


def perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "segmentation": a["segmentation"], "score": 1.0} for a in gt["annotations"]]


def test_evaluate_perfect_and_subset(synthetic, capsys):
    gt = json.loads(synthetic.read_text())
    stats = evaluate(synthetic, perfect(gt))
    assert stats["bbox"]["AP"] == pytest.approx(1.0) and stats["segm"]["AP"] == pytest.approx(1.0)
    assert "Average Precision" in capsys.readouterr().out
    red = [r for r in perfect(gt) if r["category_id"] == 1]
    stats = evaluate(synthetic, red, classes="red", verbose=False)
    assert stats["segm"]["AP"] == pytest.approx(1.0)
    assert set(stats["segm"]["per_class_AP"]) == {"red"}
    assert evaluate(synthetic, red, verbose=False)["segm"]["AP"] < 0.5


def test_evaluate_empty_and_foreign_images(synthetic, capsys, tmp_path):
    stats = evaluate(synthetic, [])
    assert stats["bbox"]["AP"] == 0 and stats["segm"]["AP"] == 0
    assert "no detections" in capsys.readouterr().out
    gt = json.loads(synthetic.read_text())
    extra = perfect(gt) + [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9,
                            "segmentation": encode_rle(np.ones((4, 4), bool))}]
    path = tmp_path / "res.json"
    path.write_text(json.dumps(extra))
    with pytest.warns(UserWarning, match="not in the ground truth"):
        stats = evaluate(synthetic, path, iou_types=("segm",), verbose=False)
    assert stats["segm"]["AP"] == pytest.approx(1.0) and "bbox" not in stats

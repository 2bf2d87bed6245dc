"""The result type checks itself and holds its masks compactly (issue 9 §5).

``Detections`` refuses inconsistent arrays naming the field; ``CompactMasks`` (tight boxes and
bit-crops) gives back the full masks bit for bit; the pipeline, the device pool's pipe codec,
the FiftyOne converter and the pictures use the compact form; ``from_coco`` inverts ``to_coco``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from refseg import PAPER, CompactMasks, Detections, InvalidDetections, RefsegError, Reference, ReferenceEncoder, \
    Segmenter
from refseg.io.coco import CocoError
from refseg.io.visualize import render
from refseg.method.results import bboxes_to_xyxy, coco_bboxes, masks_to_boxes
from refseg.method.upsampling import upsample_masks
from refseg.testing import ColorEncoder, ColorRegionProposer, draw_scene


def _random_masks(rng, n, height, width):
    """Masks of every kind: blobs, one pixel, empty, the whole image, touching each border."""
    masks = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        kind = i % 5
        if kind == 0:
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            y1, x1 = rng.integers(y0, height) + 1, rng.integers(x0, width) + 1
            masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.6
        elif kind == 1:
            masks[i, rng.integers(0, height), rng.integers(0, width)] = True
        elif kind == 3:
            masks[i] = True
        elif kind == 4:
            masks[i] = rng.random((height, width)) < 0.02
            masks[i, 0, rng.integers(0, width)] = masks[i, -1, 0] = True
    return masks


def _dets(n=4, height=30, width=40, seed=0, **changes):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, n, height, width)
    fields = dict(masks=masks, boxes=masks_to_boxes(masks).astype(np.float32),
                  scores=np.linspace(0.9, 0.1, n).astype(np.float32), labels=np.arange(n) % 2,
                  class_names=["a", "b"], pred_iou=np.full(n, 0.5, np.float32))
    fields.update(changes)
    return fields


# ---------------------------------------------------------------- validation
def test_valid_detections_are_accepted():
    d = Detections(**_dets())
    assert len(d) == 4 and d.image_size == (30, 40)
    assert len(Detections(**_dets(pred_iou=None))) == 4
    assert Detections(**_dets()).candidate_index is None  # optional
    assert Detections.empty(5, 6).candidate_index.tolist() == []
    assert len(Detections.empty(5, 6)) == 0 and Detections.empty(5, 6).image_size == (5, 6)


@pytest.mark.parametrize("field, value, words", [
    ("masks", np.zeros((30, 40), bool), "shape [N, H, W]"),
    ("masks", np.zeros((4, 30, 40), np.uint8), "bool"),
    ("boxes", np.zeros((3, 4)), "shape [4, 4]"),
    ("boxes", np.zeros((4, 5)), "shape [4, 4]"),
    ("boxes", np.array([[0, 0, 1, 1]] * 3 + [[0, 0, np.nan, 1]]), "finite"),
    ("boxes", np.array([[0, 0, 1, 1]] * 3 + [[5, 0, 4, 1]]), "box 3 has x1 > x2"),
    ("boxes", np.array([[0, 0, 1, 1], [0, 6, 1, 5], [0, 0, 1, 1], [0, 0, 1, 1]]), "box 1 has y1 > y2"),
    ("boxes", np.array([[0, 0, 1, 1], [0, 0, 41, 1], [0, 0, 1, 1], [0, 0, 1, 1]]), "outside the 30 x 40 image"),
    ("boxes", np.array([[0, -1, 1, 1]] * 4), "outside"),
    ("scores", np.zeros(3), "shape [4]"),
    ("scores", np.array([0.5, np.inf, 0.1, 0.2]), "not finite at index 1"),
    ("scores", np.array(["a"] * 4), "real numbers"),
    ("labels", np.zeros(4, np.float32), "integers"),
    ("labels", np.array([0, 1, 2, 0]), "label 2 is not an index into the 2 class names"),
    ("labels", np.array([0, -1, 0, 0]), "label -1"),
    ("labels", np.zeros((4, 1), np.int64), "shape [4]"),
    ("pred_iou", np.zeros(5), "shape [4]"),
    ("pred_iou", np.array([0.5, 0.5, np.nan, 0.5]), "not finite at index 2"),
    ("class_names", ["a", 2], "list of str"),
    ("candidate_index", np.zeros(3, np.int64), "shape [4]"),
    ("candidate_index", np.arange(4.0), "integers"),
    ("candidate_index", np.array([0, 1, -1, 3]), "indices >= 0"),
])
def test_bad_arrays_are_refused_naming_the_field(field, value, words):
    with pytest.raises(InvalidDetections) as info:
        Detections(**_dets(**{field: value}))
    assert info.value.field == field and str(info.value).startswith(f"Detections.{field}: ")
    assert words in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RefsegError)


def test_bad_compact_masks_are_refused():
    masks = _dets()["masks"]
    good = CompactMasks.from_masks(masks)
    with pytest.raises(InvalidDetections, match="crop 1 does not hold the bits"):
        CompactMasks(good.shape, good.boxes, [good.bits[0], good.bits[1][:-1] if good.bits[1].size else
                                              np.zeros(3, np.uint8), *good.bits[2:]])
    with pytest.raises(InvalidDetections, match="not inside the 30 x 40 image"):
        CompactMasks((30, 40), [[0, 0, 41, 1]], [np.zeros(6, np.uint8)])
    with pytest.raises(InvalidDetections, match="2 windows but 1 crops"):
        CompactMasks.from_crops((30, 40), [[0, 0, 1, 1], [0, 0, 1, 1]], [np.ones((1, 1), bool)])
    with pytest.raises(InvalidDetections, match="crop 0 is bool \\[2, 2\\], not the bool mask of its window"):
        CompactMasks.from_crops((30, 40), [[0, 0, 3, 2]], [np.ones((2, 2), bool)])
    with pytest.raises(InvalidDetections, match="crop 0 is uint8"):
        CompactMasks.from_crops((30, 40), [[0, 0, 2, 2]], [np.ones((2, 2), np.uint8)])


# ---------------------------------------------------------------- compact masks
@pytest.mark.parametrize("height, width", [(30, 40), (1, 17), (23, 1), (64, 64)])
def test_compact_masks_round_trip_bit_exact(height, width):
    masks = _random_masks(np.random.default_rng(height * width), 12, height, width)
    compact = CompactMasks.from_masks(masks)
    assert np.array_equal(compact.dense(), masks) and compact.dense().dtype == bool
    assert np.array_equal(compact.boxes, masks_to_boxes(masks))
    assert sum(b.nbytes for b in compact.bits) <= sum(
        ((x2 - x1) * (y2 - y1) + 7) // 8 for x1, y1, x2, y2 in compact.boxes.tolist())
    for i in range(len(masks)):
        x1, y1, x2, y2 = compact.boxes[i].tolist()
        assert np.array_equal(compact.crop(i), masks[i, y1:y2, x1:x2])
    # the same masks given in loose windows (numpy or torch crops) come out tight and equal
    rng = np.random.default_rng(1)
    windows, crops = [], []
    for i, (x1, y1, x2, y2) in enumerate(compact.boxes.tolist()):
        if x2 == x1 and i % 2:
            windows.append([0, 0, 0, 0])
            crops.append(None)
            continue
        wx1, wy1 = int(rng.integers(0, x1 + 1)), int(rng.integers(0, y1 + 1))
        wx2, wy2 = int(rng.integers(max(x2, wx1), width + 1)), int(rng.integers(max(y2, wy1), height + 1))
        windows.append([wx1, wy1, wx2, wy2])
        crop = masks[i, wy1:wy2, wx1:wx2]
        crops.append(torch.from_numpy(crop.copy()) if i % 3 == 0 else crop)
    again = CompactMasks.from_crops((height, width), windows, crops)
    assert np.array_equal(again.boxes, compact.boxes) and np.array_equal(again.dense(), masks)
    # selecting: the same as selecting the full masks
    for index in (slice(1, 7, 2), np.array([5, 0, 3]), np.arange(12) % 3 == 0):
        assert np.array_equal(compact[index].dense(), masks[index])


def test_compact_detections_behave_as_dense_ones():
    f = _dets(n=10, height=41, width=37, seed=4)
    dense = Detections(**f)
    compact = Detections(CompactMasks.from_masks(f["masks"]), f["boxes"], f["scores"], f["labels"], f["class_names"],
                         f["pred_iou"])
    assert compact._masks is None and compact.image_size == (41, 37)
    assert compact.rles() == dense.rles()  # RLE made from bit-crops, chunk by chunk
    assert compact._masks is None
    assert compact.to_coco(3, paper_box=True) == dense.to_coco(3, paper_box=True)
    sub = compact[np.array([7, 2])]
    assert sub._masks is None and np.array_equal(sub.masks, f["masks"][[7, 2]])
    assert np.array_equal(compact.masks, f["masks"]) and compact.masks is compact.masks  # made once
    assert np.array_equal(dense[2:5].compact.dense(), f["masks"][2:5])


def test_candidate_index_follows_selection_and_is_written_nowhere():
    f = _dets(n=6, seed=5)
    traced = Detections(**f, candidate_index=np.array([9, 4, 0, 7, 7, 2]))
    assert traced[np.array([5, 1])].candidate_index.tolist() == [2, 4]
    assert traced[traced.scores > 0.5].candidate_index.tolist() == [9, 4, 0]
    assert traced.to_coco(1) == Detections(**f).to_coco(1)  # COCO records are the same
    fo = pytest.importorskip("fiftyone")
    from refseg_fiftyone import convert

    for with_index, without in zip(convert.to_fiftyone_detections(traced).detections,
                                   convert.to_fiftyone_detections(Detections(**f)).detections):
        assert isinstance(with_index, fo.Detection) and with_index.to_dict().keys() == without.to_dict().keys()


def test_pipeline_makes_compact_masks_equal_to_the_reference_upsampling():
    rng = np.random.default_rng(7)
    enc, prop = ColorEncoder(), ColorRegionProposer()
    cfg = PAPER.with_overrides(**{"proposal.image_size": 256})
    refs = []
    for _ in range(2):
        img, instances = draw_scene(rng, 96, 128, 5)
        refs += [Reference(img, inst["class_name"], mask=inst["mask"]) for inst in instances]
    bank = ReferenceEncoder(enc, cfg.reference, prop, cfg.proposal.image_size).build_bank(refs)[0]
    seg = Segmenter(prop, enc, bank, cfg)
    img, _ = draw_scene(rng, 97, 131, 6)
    cand = seg.propose([img])[0]
    dets = seg.label(cand)
    assert len(dets) > 0 and dets._masks is None  # held as bit-crops, no full masks made
    assert np.array_equal(dets.boxes, masks_to_boxes(dets.masks).astype(np.float32))
    # each mask is, bit for bit, the reference call's (antialiased bilinear of a proposal's logits, > 0)
    full = upsample_masks(cand.logits, dets.image_size, 0.0, schedule="dense")
    kept = [[i for i in range(len(full)) if torch.equal(full[i], torch.from_numpy(mask))] for mask in dets.masks]
    assert all(kept) and len({k[0] for k in kept}) == len(kept)
    assert all(int(i) in k for i, k in zip(dets.candidate_index, kept))  # each names the proposal it is


# ---------------------------------------------------------------- COCO records
@pytest.mark.parametrize("paper_box", [False, True])
def test_from_coco_inverts_to_coco(paper_box):
    f = _dets(n=9, height=33, width=45, seed=2, class_names=["x", "y", "z"], labels=np.array([2, 0, 1] * 3))
    dets = Detections(**f)
    for category_ids in (None, {"x": 7, "y": 3, "z": 11}, [5, 6, 8]):
        records = dets.to_coco(1, category_ids, paper_box=paper_box)
        back = Detections.from_coco(records, 33, 45, ["x", "y", "z"], category_ids)
        assert back._masks is None and np.array_equal(back.masks, f["masks"])
        assert np.array_equal(back.boxes, f["boxes"])  # exact, whatever box the records hold
        assert back.labels.tolist() == f["labels"].tolist() and back.class_names == ["x", "y", "z"]
        assert np.array_equal(back.scores.astype(np.float32), f["scores"])
        assert back.to_coco(1, category_ids, paper_box=paper_box) == records


def test_from_coco_reads_other_segmentations_and_refuses_bad_records():
    mask = np.zeros((20, 30), bool)
    mask[4:9, 10:20] = True
    uncompressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    polygon = [[10, 4, 20, 4, 20, 9, 10, 9]]
    records = [{"category_id": 1, "segmentation": {"size": [20, 30], "counts": _runs(mask)}, "score": 0.5},
               {"category_id": 1, "segmentation": {"size": [20, 30], "counts": uncompressed["counts"]}},
               {"category_id": 2, "segmentation": polygon, "score": 0.25},
               {"category_id": 2, "bbox": [25, 15, 10, 10], "score": 0.1}]  # box only, sticking out
    dets = Detections.from_coco(records, 20, 30, ["a", "b"])
    assert np.array_equal(dets.masks[0], mask) and np.array_equal(dets.masks[1], mask)
    assert dets.masks[2].sum() > 0 and not dets.masks[3].any()
    assert dets.boxes.tolist()[:2] == [[10, 4, 20, 9]] * 2 and dets.boxes.tolist()[3] == [25, 15, 30, 20]
    assert dets.scores.tolist() == [0.5, 1.0, 0.25, 0.1] and dets.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(CocoError, match=r"result record \[1\] .* categories \[1, 2\]"):
        Detections.from_coco([records[0], {**records[0], "category_id": 9}], 20, 30, ["a", "b"])
    with pytest.raises(CocoError, match=r"record \[0\].*RLE size \[20, 30\] does not match the image size \[21, 30\]"):
        Detections.from_coco(records[:1], 21, 30, ["a", "b"])


def _runs(mask):
    """Uncompressed COCO RLE counts of a mask (column-major runs, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_box_helpers_convert_both_ways():
    boxes = np.array([[3, 2, 9, 5], [0, 0, 0, 0]])
    assert coco_bboxes(boxes).tolist() == [[3, 2, 6, 3], [0, 0, 0, 0]]
    assert coco_bboxes(boxes, paper_box=True).tolist() == [[3, 2, 5, 2], [0, 0, 0, 0]]
    assert bboxes_to_xyxy(coco_bboxes(boxes), 10, 12).tolist() == boxes.tolist()
    assert bboxes_to_xyxy([[8, 7, 10, 10]], 10, 12).tolist() == [[8, 7, 12, 10]]


def test_pictures_of_records_and_of_detections_agree():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (33, 45, 3), dtype=np.uint8)
    dets = Detections(**_dets(n=6, height=33, width=45, seed=6))
    records = dets.to_coco(1, [4, 9])
    picture = render(image, dets)
    assert not np.array_equal(picture, image)
    assert np.array_equal(render(image, records, category_names={4: "a", 9: "b"}), picture)
    # records for another image size: boxes only; a record without category: drawn as "?"
    assert render(image, [{**records[0], "segmentation": {"size": [5, 5], "counts": "25"}}]).shape == image.shape
    assert not np.array_equal(render(image, [{"bbox": [1, 1, 10, 10], "score": 0.9}]), image)


def test_fiftyone_converter_uses_the_compact_form():
    fo = pytest.importorskip("fiftyone")
    from refseg_fiftyone import convert

    f = _dets(n=10, height=41, width=37, seed=8)
    dets = Detections(CompactMasks.from_masks(f["masks"]), f["boxes"], f["scores"], f["labels"], f["class_names"],
                      f["pred_iou"])
    labels = convert.to_fiftyone_detections(dets, refseg_run="r1")
    assert dets._masks is None  # crops and boxes taken as they are: no full mask made
    assert labels["refseg_run"] == "r1"
    nonempty = [i for i in range(10) if f["masks"][i].any()]
    assert len(labels.detections) == len(nonempty) < 10  # an empty mask is dropped
    for i, det in zip(nonempty, labels.detections):
        reference = fo.Detection.from_mask(f["masks"][i], label=f["class_names"][f["labels"][i]])
        assert det.label == reference.label and det.confidence == float(f["scores"][i])
        assert np.allclose(det.bounding_box, reference.bounding_box) and np.array_equal(det.mask, reference.mask)
        assert np.array_equal(convert.detection_mask(det, 41, 37), f["masks"][i])  # and back, bit for bit
    dense = convert.to_fiftyone_detections(Detections(**f))
    assert [d.bounding_box for d in dense.detections] == [d.bounding_box for d in labels.detections]

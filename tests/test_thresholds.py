"""Per-class thresholds from the references (refseg.method.thresholds, refseg calibrate, predict --class-thresholds):
the choice rule on hand-made cases, leave-one-out on synthetic scenes (planted instances and distractors) where the
estimated precision is close to the one measured on held-out images, and stale thresholds refused."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from refseg import PAPER, MemoryBank, ReferenceEncoder, Segmenter, decode_rle
from refseg.cli import main
from refseg.method.thresholds import (NO_DATA, REACHED, UNREACHABLE, HeldOutImage, ThresholdError, ThresholdReport,
                                      apply_thresholds,
                                      choose_threshold, estimate_thresholds, match_detections, store_thresholds,
                                      stored_thresholds)
from refseg.testing import ColorEncoder, ColorRegionProposer, coco_references, make_synthetic_coco

CFG = PAPER.with_overrides(**{"proposal.image_size": 512})
TOY = ["--proposer", "refseg.testing:ColorRegionProposer", "--encoder", "refseg.testing:ColorEncoder"]


def test_the_lowest_threshold_that_reaches_the_target():
    scored = [(0.9, True), (0.8, True), (0.7, False), (0.6, True), (0.5, False)]
    t = choose_threshold("cat", scored, instances=4, target_precision=0.75)
    # cuts: 1/1, 2/2, 2/3, 3/4 (0.75: the lowest that qualifies), 3/5
    assert (t.status, t.threshold, t.precision, t.recall, t.kept, t.detections) == (REACHED, 0.6, 0.75, 0.75, 4, 5)
    assert choose_threshold("cat", scored, 4, 0.95).threshold == 0.8
    # equal scores are kept or dropped together
    tied = choose_threshold("cat", [(0.9, True), (0.5, False), (0.5, True)], 2, 0.9)
    assert (tied.threshold, tied.kept) == (0.9, 1)
    unreachable = choose_threshold("cat", [(0.9, False), (0.4, True)], 1, 0.9)
    assert unreachable.status == UNREACHABLE and unreachable.precision == 0.5
    assert choose_threshold("cat", [], 3, 0.9).status == NO_DATA
    assert choose_threshold("cat", [(0.9, False)], 0, 0.9).status == NO_DATA


def test_matching_is_one_to_one_by_score():
    truth = np.zeros((1, 8, 8), bool)
    truth[0, :4] = True
    near = truth[0].copy()
    near[4] = True  # IoU 4/5 with the instance
    from refseg import Detections

    dets = Detections.from_masks(np.stack([near, truth[0]]), scores=np.array([0.5, 0.9], np.float32),
                                 labels=np.array([0, 0]), class_names=["cat"])
    got = match_detections(dets, truth, ["cat"])
    assert got == [("cat", pytest.approx(0.9), True), ("cat", pytest.approx(0.5), False)]  # the instance once
    assert [hit for _, _, hit in match_detections(dets, truth, ["dog"])] == [False, False]


def _scenes(tmp_path):
    from pycocotools.coco import COCO

    image_dir, json_path = make_synthetic_coco(tmp_path, n_images=20, seed=5)
    return image_dir, json_path, COCO(str(json_path))


def _held_out(coco, image_dir, bank, image_id):
    name = coco.imgs[image_id]["file_name"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    return HeldOutImage(image_dir / name, [e.id for e in bank.find(image=name)],
                        np.array([decode_rle(a["segmentation"]) for a in anns]),
                        [coco.cats[a["category_id"]]["name"] for a in anns], name)


def test_leave_one_out_estimate_is_close_to_the_precision_on_held_out_images(tmp_path):
    image_dir, _, coco = _scenes(tmp_path)
    refs = coco_references(coco, image_dir, range(1, 9), with_source=True)
    bank, _ = ReferenceEncoder(ColorEncoder(), CFG.reference, ColorRegionProposer(), 512).build_bank(refs)
    seg = Segmenter(ColorRegionProposer(), ColorEncoder(), bank, CFG)
    report = estimate_thresholds(seg, [_held_out(coco, image_dir, bank, i) for i in range(1, 9)], 0.9)
    assert report.images == 8 and seg.bank is bank
    assert all(t.status == REACHED and t.precision >= 0.9 for t in report.classes.values()), report.lines()
    kept = hits = 0
    estimated_kept = sum(t.kept for t in report.classes.values())
    estimated_hits = sum(round(t.precision * t.kept) for t in report.classes.values())
    unfiltered = 0
    for i in range(9, 21):
        item = _held_out(coco, image_dir, bank, i)
        dets = seg.predict(item.image)
        unfiltered += len(dets)
        for _, score, hit in match_detections(apply_thresholds(dets, report), item.truth_masks, item.truth_classes):
            kept += 1
            hits += hit
    measured, estimated = hits / kept, estimated_hits / estimated_kept
    # pooled over the classes: 12 unseen scenes against 8 held-out ones; the distractors are what is cut away
    assert kept < unfiltered
    assert abs(measured - estimated) <= 0.1, (measured, estimated)


def test_stored_thresholds_are_tied_to_the_bank_content(tmp_path):
    bank = MemoryBank(ColorEncoder().settings())
    bank.add("red", torch.ones(ColorEncoder().dim))
    with pytest.raises(ThresholdError, match="holds no class thresholds"):
        stored_thresholds(bank)
    store_thresholds(bank, ThresholdReport(0.9, {"red": choose_threshold("red", [(0.8, True)], 1, 0.9)}))
    loaded = MemoryBank.load(bank.save(tmp_path / "b.safetensors"))
    assert stored_thresholds(loaded).classes["red"].threshold == pytest.approx(0.8)
    loaded.add("red", torch.ones(ColorEncoder().dim) * 2)
    with pytest.raises(ThresholdError, match="estimated for other references"):
        stored_thresholds(loaded)
    with pytest.raises(ThresholdError, match="estimated for other references"):
        Segmenter(ColorRegionProposer(), ColorEncoder(), loaded, CFG.with_overrides(**{"merge.class_thresholds": True}))


def test_calibrate_then_predict_with_class_thresholds(tmp_path, capsys):
    image_dir, json_path, coco = _scenes(tmp_path)
    refs = {"images": [coco.imgs[i] for i in range(1, 7)], "categories": list(coco.cats.values()),
            "annotations": coco.loadAnns(coco.getAnnIds(imgIds=list(range(1, 7))))}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    bank = tmp_path / "bank.safetensors"
    common = [*TOY, "--set", "proposal.image_size=512"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["build-bank", "--references", str(tmp_path / "refs.json"), "--images", str(image_dir),
                     "--out", str(bank), "--input-size", "224", *common]) == 0
        # thresholds asked for before any were estimated: refused in one line
        assert main(["predict", "--bank", str(bank), "--images", str(image_dir), "--coco", str(json_path),
                     "--out", str(tmp_path / "r0.json"), "--class-thresholds", *common]) == 2
    assert "holds no class thresholds" in capsys.readouterr().err
    assert main(["calibrate", "--bank", str(bank), "--images", str(image_dir), "--ground-truth", str(json_path),
                 "--target-precision", "0.9", *common]) == 0
    out = capsys.readouterr().out
    assert "labelling 6 reference image(s)" in out and "precision" in out
    report = stored_thresholds(MemoryBank.load(bank))
    with contextlib.redirect_stdout(io.StringIO()):
        for name, extra in (("all.json", []), ("kept.json", ["--class-thresholds"])):
            assert main(["predict", "--bank", str(bank), "--images", str(image_dir), "--coco", str(json_path),
                         "--out", str(tmp_path / name), "--quiet", *extra, *common]) == 0
    every = json.loads((tmp_path / "all.json").read_text())
    kept = json.loads((tmp_path / "kept.json").read_text())
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    assert 0 < len(kept) < len(every)
    assert all(r["score"] >= report.classes[names[r["category_id"]]].threshold for r in kept)
    assert sorted((r["image_id"], r["score"]) for r in kept) == sorted(
        (r["image_id"], r["score"]) for r in every if r["score"] >= report.classes[names[r["category_id"]]].threshold)

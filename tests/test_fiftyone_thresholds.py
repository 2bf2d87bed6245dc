"""Per-class thresholds in the plugin: calibrate_thresholds on the reference samples (leave-one-out), stored with
the bank and shown in its record, applied by auto_label on request; a bank changed since refuses stale ones.
A private database (tests/conftest.py), the toy components, real FiftyOne."""

from __future__ import annotations

import pytest

fo = pytest.importorskip("fiftyone")
import refseg_fiftyone.core  # noqa: E402

from refseg import MemoryBank  # noqa: E402
from test_fiftyone_plugin import TOY, build_toy_bank, make_dataset, op, unique  # noqa: E402

core = refseg_fiftyone.core
AUTO = {k: v for k, v in TOY.items() if k == "device"}


def test_calibrate_store_and_apply(tmp_path):
    dataset = make_dataset(tmp_path / "img", n_images=10, n_references=5)
    dataset.name = unique("thresholds")
    build_toy_bank(dataset)
    with pytest.raises(ValueError, match="holds no class thresholds"):
        core.auto_label(dataset, class_thresholds=True, **AUTO)
    report = op("calibrate_thresholds")(dataset, label_field="ground_truth", target_precision=0.9, device="cpu")
    assert report["images"] == 5 and len(report["classes"]) == 3
    by_class = {c["class_name"]: c for c in report["classes"]}
    record = core.bank_record(dataset, core.DEFAULT_BANK)
    assert record["thresholds"]["classes"] == report["classes"]
    bank = MemoryBank.load(record["path"])
    assert set(bank.thresholds["classes"]) == set(by_class)

    targets = dataset.match_tags("reference", bool=False)
    every = core.auto_label(dataset, label_field="every", **AUTO)
    kept = op("auto_label")(dataset, label_field="kept", class_thresholds=True, delegate=False, **AUTO)  # the operator
    assert every["num_labelled"] == kept["num_labelled"] == len(targets)
    n_every = n_kept = 0
    for sample in targets.iter_samples():
        passing = [d for d in sample["every"].detections
                   if by_class[d.label]["status"] == "reached" and d.confidence >= by_class[d.label]["threshold"]]
        assert sorted(d.confidence for d in sample["kept"].detections) == sorted(d.confidence for d in passing)
        n_every += len(sample["every"].detections)
        n_kept += len(sample["kept"].detections)
    assert 0 < n_kept < n_every  # the thresholds cut the distractors' low-scoring matches

    # a bank changed since (update from review) refuses its stale thresholds
    sample = targets.first()
    sample["every"].detections[0].tags = ["rejected"]
    sample.save()
    core.update_memory_bank_from_review(dataset, pred_field="every", device="cpu")
    assert "thresholds" not in core.bank_record(dataset, core.DEFAULT_BANK)
    with pytest.raises(ValueError, match="estimated for other references"):
        core.auto_label(dataset, label_field="again", class_thresholds=True, **AUTO)


def test_calibration_leaves_out_the_samples_of_references_added_from_a_review(tmp_path):
    """A prediction accepted (or corrected) on a target sample becomes a reference, but that sample's instances
    are not annotated in the ground-truth field: it is no held-out image, or its other detections would all
    count as false positives."""
    dataset = make_dataset(tmp_path / "img", n_images=8, n_references=3)
    build_toy_bank(dataset)
    core.auto_label(dataset, label_field="pred", **AUTO)
    target = dataset.match_tags("reference", bool=False).first()
    target["pred"].detections[0].tags = ["accepted"]
    target.ground_truth = None  # as on a real target: not annotated
    target.save()
    added = core.update_memory_bank_from_review(dataset, pred_field="pred", device="cpu")
    assert added["num_added"] == 1
    report = core.calibrate_thresholds(dataset, label_field="ground_truth", target_precision=0.9, device="cpu")
    assert report["images"] == 3
    assert all(c["threshold"] is not None for c in report["classes"])

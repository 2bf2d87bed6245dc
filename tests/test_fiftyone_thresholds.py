"""Thresholds in the plugin: calibrate_thresholds estimates per-class score thresholds and / or the prompt-selection
threshold on the reference samples (leave-one-out), stores them with the bank and shows them in its record, the
refseg panel and the forms; auto_label applies them on request; a bank changed since refuses stale ones.
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


GRID = dict(TOY, proposer="refseg.testing:GridColorProposer",  # the toy proposer with a 16 x 16 prompt grid
            overrides="proposal.image_size=256, proposal.points_per_side=16")


def test_prompt_threshold_calibrated_shown_applied_and_refused_when_stale(tmp_path, monkeypatch):
    from refseg.method.prompt_selection import stored_prompt_threshold
    from refseg.testing import GridColorProposer
    from refseg_fiftyone import status
    from test_fiftyone_forms import form, invalid
    from test_refseg_status import _panel_event

    dataset = make_dataset(tmp_path / "img", n_images=8, n_references=4)
    dataset.name = unique("prompts")
    build_toy_bank(dataset, **GRID)
    assert "prompt_selection" not in form("auto_label", dataset)  # no threshold stored: no checkbox
    with pytest.raises(ValueError, match="holds no prompt similarity threshold.*calibrate_thresholds"):
        core.auto_label(dataset, prompt_selection=True, **AUTO)
    assert invalid(form("calibrate_thresholds", dataset, class_thresholds=False, prompt_threshold=False))

    # the prompt threshold only: no ground truth needed, stored in the bank file as refseg calibrate stores it
    report = op("calibrate_thresholds")(dataset, target_precision=None, prompt_share=0.95, device="cpu")
    prompt = report["prompt_threshold"]
    assert "classes" not in report and report["images"] == 4 and prompt["share"] == 0.95
    assert prompt["kept"] >= 0.95 * prompt["detections"] > 0 and prompt["prompts_kept"] < prompt["prompts"]
    record = core.bank_record(dataset, core.DEFAULT_BANK)
    assert record["prompt_threshold"] == prompt and "thresholds" not in record
    bank = MemoryBank.load(record["path"])
    assert stored_prompt_threshold(bank) == prompt["threshold"] and bank.prompt_similarity["kept"] == prompt["kept"]
    # then the class thresholds: the prompt threshold stays; the panel's bank section and the forms show both
    report = op("calibrate_thresholds")(dataset, label_field="ground_truth", device="cpu")
    assert "prompt_threshold" not in report and len(report["classes"]) == 3
    record = core.bank_record(dataset, core.DEFAULT_BANK)
    assert record["prompt_threshold"] == prompt and record["thresholds"]["classes"] == report["classes"]
    summary = status.bank_summary(dataset, core.DEFAULT_BANK)
    assert f"{prompt['threshold']:.4f}" in summary["prompt_threshold"] and "target precision 0.9" in summary[
        "class_thresholds"]
    shown = _panel_event(dataset, "on_load")["output"]["type"]["properties"]
    assert shown["bank_0_prompt_threshold"]["default"] == f"Prompt threshold: {summary['prompt_threshold']}"
    assert shown["bank_0_class_thresholds"]["default"] == f"Class thresholds: {summary['class_thresholds']}"
    checkbox = form("auto_label", dataset)["prompt_selection"]
    assert f"(stored threshold {prompt['threshold']:.3f})" in checkbox.view.label
    assert "faster" in checkbox.view.description and "recall" in checkbox.view.description
    assert f"{prompt['threshold']:.4f}" in form("calibrate_thresholds", dataset)["stored_notice"].view.label

    # applied: fewer prompts decoded, the run keyed (and reported) with the threshold
    decoded = []
    propose = GridColorProposer.propose

    def counting(self, images, prompt_mask=None):
        decoded.append(len(images) * len(self.prompt_points) if prompt_mask is None else int(prompt_mask.sum()))
        return propose(self, images, prompt_mask)

    monkeypatch.setattr(GridColorProposer, "propose", counting)
    every = core.auto_label(dataset, label_field="every", **AUTO)
    n_every, decoded[:] = sum(decoded), []
    fast = op("auto_label")(dataset, label_field="fast", prompt_selection=True, delegate=False, **AUTO)
    assert fast["num_labelled"] == every["num_labelled"] == 4 and 0 < sum(decoded) < n_every
    assert fast["prompt_threshold"] == prompt["threshold"] and "prompt_threshold" not in every
    assert fast["run_key"] != every["run_key"]  # the run's identity holds the bank's threshold
    assert 0 < fast["num_instances"] <= every["num_instances"]

    # a bank changed since (update from review) refuses its stale threshold, before any model loads
    sample = dataset.match_tags("reference", bool=False).first()
    sample["every"].detections[0].tags = ["rejected"]
    sample.save()
    core.update_memory_bank_from_review(dataset, pred_field="every", device="cpu")
    assert "prompt_threshold" not in core.bank_record(dataset, core.DEFAULT_BANK)
    assert "prompt_selection" not in form("auto_label", dataset)
    decoded[:] = []
    with pytest.raises(ValueError, match="chosen for other references .*calibrate_thresholds with its prompt"):
        core.auto_label(dataset, label_field="again", prompt_selection=True, **AUTO)
    assert decoded == []


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

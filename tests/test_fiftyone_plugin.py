"""The FiftyOne plugin (``fiftyone.yml`` + ``fiftyone_plugin/``) against a real FiftyOne and its own MongoDB.

Every operator is run through FiftyOne's operator machinery (``execute_operator``,
the delegated-operation queue, the ``fiftyone delegated launch`` worker), on
synthetic images with planted coloured shapes and the deterministic toy models of
:mod:`refseg.testing`; one test runs the real SAM2 / DINOv2 architectures with
random weights. ``tests/conftest.py`` points FiftyOne at a private database and
plugins folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

fo = pytest.importorskip("fiftyone")
import refseg  # noqa: E402
import refseg_fiftyone.convert  # noqa: E402
import refseg_fiftyone.core  # noqa: E402
import fiftyone.operators as foo  # noqa: E402
from fiftyone.operators.delegated import DelegatedOperationService  # noqa: E402
from fiftyone.operators.executor import ExecutionContext, ExecutionError, Executor  # noqa: E402

from refseg.testing import CLASSES, DISTRACTORS, PALETTE, draw_scene  # noqa: E402
from conftest import clear_queued_operations  # noqa: E402

PLUGIN = "@refseg/refseg"
OPERATORS = ("build_memory_bank", "auto_label", "boxes_to_masks", "evaluate_auto_labels", "export_coco",
             "update_memory_bank_from_review", "calibrate_thresholds", "find_corrections", "remask_boxes")
# the real architectures, smallest and fast: random weights, 256 px, a 4 x 4 prompt grid
REAL_SMALL = dict(proposer="sam2.1_hiera_t", encoder="dinov2_vits14", encoder_input_size=224, device="cpu",
                  overrides="proposal.image_size=256, proposal.points_per_side=4", random_init=True)
TOY = dict(proposer="refseg.testing:ColorRegionProposer", encoder="refseg.testing:ColorEncoder",
           overrides="proposal.image_size=256", encoder_input_size=224, device="cpu")


# ---------------------------------------------------------------------------- helpers


def uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


def op(name: str):
    return foo.get_operator(uri(name))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def full_mask(det, height: int, width: int) -> np.ndarray:
    return refseg_fiftyone.convert.detection_mask(det, height, width)


def _noisy(rng, shape, colour):
    return np.clip(np.array(colour, np.float32) + rng.normal(0, 6, shape + (3,)), 0, 255)


def make_dataset(root: Path, n_images: int = 12, n_references: int = 3, seed: int = 0, height: int = 160,
                 width: int = 208, reference_tag: str = "reference") -> fo.Dataset:
    """Synthetic dataset: ``ground_truth`` (object classes, masks made by FiftyOne's ``from_mask``) and
    ``distractors`` (the unannotated yellow / magenta shapes); the first ``n_references`` samples tagged."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_images):
        image, instances = draw_scene(rng, height, width, 5)
        path = root / f"scene_{i:03d}.png"
        Image.fromarray(image).save(path)
        gt = [fo.Detection.from_mask(x["mask"], label=x["class_name"]) for x in instances if x["class_name"] in CLASSES]
        other = [fo.Detection.from_mask(x["mask"], label=x["class_name"]) for x in instances
                 if x["class_name"] in DISTRACTORS]
        samples.append(fo.Sample(filepath=str(path), tags=[reference_tag] if i < n_references else [],
                                 ground_truth=fo.Detections(detections=gt), distractors=fo.Detections(detections=other)))
    dataset = fo.Dataset(unique("refseg-test"))
    dataset.add_samples(samples)
    return dataset


def build_toy_bank(dataset, **kwargs):
    params = dict(label_field="ground_truth", **TOY)
    params.update(kwargs)
    return op("build_memory_bank")(dataset, **params)


def run_queued(dataset) -> list:
    """Run the dataset's queued delegated operations in this process, as a worker would."""
    results = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    for r in results:
        assert r is not None and r.error is None, r.error if r is not None else "not run"
    return results


def labelled_count(dataset, field="refseg") -> int:
    return len(dataset.exists(field))


@pytest.fixture()
def dataset(tmp_path):
    ds = make_dataset(tmp_path / "images")
    yield ds
    ds.delete()


# ---------------------------------------------------------------------------- discovery and conversion


def test_plugin_is_discovered_with_all_operators():
    plugins = {p.name: p for p in fo.plugins.list_plugins()}
    assert PLUGIN in plugins, f"plugins found: {sorted(plugins)}"
    definition = plugins[PLUGIN]
    assert definition.py_entry == "fiftyone_plugin/__init__.py"
    # FiftyOne lists panels with them; announce_ended_jobs is the App's, on dataset open (unlisted)
    assert sorted(definition.operators) == sorted(OPERATORS + ("refseg_panel", "announce_ended_jobs"))
    registered = {o.uri for o in foo.list_operators()}
    assert {uri(n) for n in OPERATORS} | {uri("announce_ended_jobs")} <= registered
    for name in OPERATORS:
        operator = op(name)
        assert operator.config.allow_delegated_execution
        assert callable(operator)


def test_masks_convert_to_full_images_exactly():
    """Cropped FiftyOne masks -> full-image masks -> back, pixel for pixel, for boxes at every offset.

    FiftyOne's own renderer truncates box corners (x * width may land just below an
    integer), which can shift a mask by a pixel; the plugin rounds, so a mask made by
    ``fo.Detection.from_mask`` comes back exactly.
    """
    convert = refseg_fiftyone.convert
    rng = np.random.default_rng(3)
    fiftyone_ious = []
    for height, width in ((160, 208), (97, 131), (480, 640)):
        for _ in range(40):
            truth = np.zeros((height, width), bool)
            y0, x0 = rng.integers(0, height - 5), rng.integers(0, width - 5)
            y1, x1 = rng.integers(y0 + 1, height + 1), rng.integers(x0 + 1, width + 1)
            truth[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
            if not truth.any():
                continue
            det = fo.Detection.from_mask(truth, label="thing")
            mine = convert.detection_mask(det, height, width)
            assert np.array_equal(mine, truth)
            back = convert.to_fiftyone_detection(mine, "thing")
            assert np.allclose(back.bounding_box, det.bounding_box) and np.array_equal(back.mask, det.mask)
            theirs = fo.Detections(detections=[det]).to_segmentation(
                frame_size=(width, height), mask_targets={1: "thing"}).mask > 0
            fiftyone_ious.append(iou(theirs, truth))
    assert np.mean(fiftyone_ious) > 0.9
    # a box sticking out of the image, and a mask stored at another resolution than its box
    det = fo.Detection(label="x", bounding_box=[0.9, 0.9, 0.2, 0.2], mask=np.ones((4, 4), bool))
    m = convert.detection_mask(det, 100, 100)
    assert m.sum() == 100 and m[90:, 90:].all()
    # masks on disk (mask_path) and 0/255 uint8 masks are read too
    det = fo.Detection(label="x", bounding_box=[0.5, 0.5, 0.25, 0.25], mask=np.full((25, 25), 255, np.uint8))
    assert convert.detection_mask(det, 100, 100).sum() == 625


# ---------------------------------------------------------------------------- the workflow


def test_end_to_end_workflow_through_operators(dataset, tmp_path):
    """tag -> build bank -> auto_label (delegated, real queue) -> evaluate -> export COCO (RLE) -> re-import."""
    # build the bank through execute_operator, the way the App runs it
    result = foo.execute_operator(uri("build_memory_bank"), ctx=dict(dataset=dataset, params=dict(
        label_field="ground_truth", bank_name="toy", **TOY)))
    report = result.result
    assert {r["class"] for r in report["classes"] if r["used"] > 0} == set(CLASSES)
    assert report["num_skipped"] == 0
    record = dataset.info["refseg_banks"]["toy"]
    assert Path(record["path"]).is_file() and Path(record["path"]).is_relative_to(os.environ["REFSEG_BANK_DIR"])
    assert record["encoder"] == TOY["encoder"] and record["preset"] == "paper"
    assert {c["class"] for c in record["counts"]} == set(CLASSES)

    # delegated: the job waits in the queue
    queued = foo.execute_operator(uri("auto_label"), ctx=dict(dataset=dataset, params=dict(bank_name="toy",
                                                                                            delegate=True)))
    assert queued.delegated
    assert labelled_count(dataset) == 0
    (done,) = run_queued(dataset)
    doc = DelegatedOperationService().get(queued.result["id"])
    assert doc.run_state == "completed"
    assert doc.status is not None and doc.status.progress == pytest.approx(1.0)
    run = doc.result.result
    assert isinstance(run["run_key"], str) and len(run["run_key"]) == 16
    assert run["num_labelled"] == 9 and run["num_failed"] == 0 and run["num_instances"] > 9
    dataset.reload()
    assert labelled_count(dataset) == 9
    assert len(dataset.match_tags("reference").exists("refseg")) == 0  # references are not labelled
    for sample in dataset.exists("refseg"):
        assert sample.refseg.refseg_run == run["run_key"] and sample.refseg.refseg_bank == "toy"
        h, w = np.asarray(Image.open(sample.filepath)).shape[:2]
        for det in sample.refseg.detections:
            assert det.label in CLASSES and 0 <= det.confidence <= 1
            x, y, bw, bh = det.bounding_box
            assert det.mask.shape == (round(bh * h), round(bw * w)) and det.mask.any()
    assert dataset.info["refseg_runs"]["refseg"]["run_key"] == run["run_key"]

    # FiftyOne's own COCO-style mask evaluation
    ev = foo.execute_operator(uri("evaluate_auto_labels"), ctx=dict(dataset=dataset, params=dict(
        pred_field="refseg", gt_field="ground_truth", eval_key="toy_eval"))).result
    assert ev["mAP"] > 0.7, ev
    assert {c["class"] for c in ev["classes"]} >= set(CLASSES)
    assert all(c["AP"] > 0.6 for c in ev["classes"] if c["class"] in CLASSES)
    assert "toy_eval" in dataset.list_evaluations()
    assert ev["tp"] >= ev["fn"] * 5

    # lossless RLE export with the images, and back through FiftyOne's COCO importer
    export_dir = tmp_path / "coco_rle"
    ex = foo.execute_operator(uri("export_coco"), ctx=dict(dataset=dataset, params=dict(
        label_field="refseg", export_dir=str(export_dir), mask_format="rle", export_media=True))).result
    coco = json.loads(Path(ex["labels_path"]).read_text())
    assert len(coco["images"]) == len(dataset) and all(isinstance(a["segmentation"]["counts"], str)
                                                       for a in coco["annotations"])
    assert all(a["iscrowd"] == 0 and 0 <= a["score"] <= 1 for a in coco["annotations"])
    assert (export_dir / "data" / Path(dataset.first().filepath).name).is_file()
    back = fo.Dataset.from_dir(dataset_dir=str(export_dir), dataset_type=fo.types.COCODetectionDataset,
                               label_types="segmentations", label_field="refseg", name=unique("reimport"))
    try:
        by_name = {Path(s.filepath).name: s for s in back}
        compared = 0
        for sample in dataset.exists("refseg"):
            other = by_name[Path(sample.filepath).name]
            h, w = np.asarray(Image.open(sample.filepath)).shape[:2]
            mine = sorted(sample.refseg.detections, key=lambda d: -d.confidence)
            theirs = sorted(other.refseg.detections, key=lambda d: -d.confidence)
            assert len(mine) == len(theirs)
            for a, b in zip(mine, theirs):
                assert a.label == b.label
                assert iou(full_mask(a, h, w), full_mask(b, h, w)) == 1.0
                compared += 1
        assert compared == run["num_instances"]
    finally:
        back.delete()

    # polygons via FiftyOne's own exporter: lossy but close
    poly_dir = tmp_path / "coco_poly"
    foo.execute_operator(uri("export_coco"), ctx=dict(dataset=dataset, params=dict(
        label_field="refseg", export_dir=str(poly_dir), mask_format="polygons")))
    coco = json.loads((poly_dir / "labels.json").read_text())
    assert coco["annotations"] and all(isinstance(a["segmentation"], list) for a in coco["annotations"])
    assert all(os.path.isabs(im["file_name"]) for im in coco["images"])


def test_immediate_run_streams_progress_to_the_app(dataset):
    build_toy_bank(dataset)
    auto = op("auto_label")
    ctx = ExecutionContext(request_params=dict(dataset_name=dataset.name, params=dict(delegate=False)),
                           executor=Executor())
    assert auto.resolve_delegation(ctx) is False
    messages = list(asyncio.run(auto.execute(ctx)))  # a coroutine (FiftyOne awaits it) returning a generator
    triggered = [m.body.operator_uri for m in messages]
    progress = [m.body.params["progress"] for m in messages if m.body.operator_uri == "set_progress"]
    assert triggered.count("set_progress") == 10 and progress[-1] == pytest.approx(1.0)
    # then the grid and the counts, and the sample views the App holds (fiftyone_plugin/refseg_app.js)
    assert triggered[-3:] == ["notify", "reload_dataset", uri("refresh_sample_views")]
    assert labelled_count(dataset) == 9

    # the form: a run expected to be quick (toy models) is immediate by default (see test_fiftyone_forms.py)
    ctx = ExecutionContext(request_params=dict(dataset_name=dataset.name, params={}), executor=Executor())
    assert auto.resolve_delegation(ctx) is False
    form = auto.resolve_input(ctx).type.properties
    assert form["bank_name"].type.values == ["default"] and form["delegate"].default is False


def test_operators_called_under_a_running_event_loop_return_their_report(dataset):
    """In a notebook (or under Playwright's sync API) an event loop is running: ``fo.execute_operator`` then
    returns a task that has not run yet; the operators' Python calls still block and return the report."""
    build_toy_bank(dataset)

    async def notebook_cell():
        return op("auto_label")(dataset, score_threshold=0.5, delegate=False), op("find_corrections")(dataset)

    labelled, corrections = asyncio.run(notebook_cell())
    assert labelled["num_labelled"] == 9 and labelled_count(dataset) == 9
    assert corrections["num_edited"] == 0 and "tagged" in corrections["summary"]

    async def failing_cell():
        return op("auto_label")(dataset, bank_name="no-such-bank", delegate=False)

    with pytest.raises(ExecutionError, match="no-such-bank"):
        asyncio.run(failing_cell())


def test_resume_after_interruption_loses_and_duplicates_nothing(dataset, monkeypatch):
    build_toy_bank(dataset)
    core = refseg_fiftyone.core
    real_write = core._write_labels
    calls = {"n": 0}

    def crash_after_four(sample, field, labels):
        if calls["n"] == 4:
            raise RuntimeError("worker killed")
        calls["n"] += 1
        real_write(sample, field, labels)

    monkeypatch.setattr(core, "_write_labels", crash_after_four)
    with pytest.raises(ExecutionError, match="worker killed"):
        op("auto_label")(dataset, delegate=False)
    assert labelled_count(dataset) == 4
    monkeypatch.setattr(core, "_write_labels", real_write)

    # rerun as a delegated job: the four finished samples are kept, the five others labelled
    op("auto_label")(dataset, delegate=True)
    (result,) = run_queued(dataset)
    report = result.result
    assert report["num_already_done"] == 4 and report["num_labelled"] == 5
    dataset.reload()
    assert labelled_count(dataset) == 9
    resumed = {s.id: sorted((d.label, round(d.confidence, 6)) for d in s.refseg.detections)
               for s in dataset.exists("refseg")}

    # nothing left to do; then a full relabel gives exactly the same labels (no duplicates)
    again = op("auto_label")(dataset)
    assert again["num_labelled"] == 0 and again["num_already_done"] == 9
    fresh = op("auto_label")(dataset, existing="overwrite")
    assert fresh["num_labelled"] == 9
    dataset.reload()
    assert {s.id: sorted((d.label, round(d.confidence, 6)) for d in s.refseg.detections)
            for s in dataset.exists("refseg")} == resumed

    # other settings make another run: resume relabels everything; skip_labelled relabels nothing
    assert op("auto_label")(dataset, score_threshold=0.5)["num_labelled"] == 9
    assert op("auto_label")(dataset, existing="skip_labelled", score_threshold=0.7)["num_labelled"] == 0


def _count_batches(monkeypatch, on_call):
    """Wrap Segmenter.label_prepared: ``on_call(n)`` runs before batch n; returns the number of images labelled."""
    real = refseg.Segmenter.label_prepared
    seen = {"calls": 0, "images": 0}

    def counting(self, items, cache=None):
        seen["calls"] += 1
        on_call(seen["calls"])
        seen["images"] += len(items)
        return real(self, items, cache)

    monkeypatch.setattr(refseg.Segmenter, "label_prepared", counting)
    return seen


def _last_run(dataset) -> dict:
    dataset.reload()
    return dataset.info[refseg_fiftyone.core.RUNS_KEY]["refseg"]


def test_keyboard_interrupt_keeps_finished_samples_and_a_rerun_labels_only_the_rest(dataset, monkeypatch):
    build_toy_bank(dataset)

    def stop_third(n):
        if n == 3:
            raise KeyboardInterrupt

    _count_batches(monkeypatch, stop_third)
    with pytest.raises(KeyboardInterrupt):
        refseg_fiftyone.core.auto_label(dataset, batch_size=2)
    assert labelled_count(dataset) == 4
    run = _last_run(dataset)
    assert run["status"] == "interrupted" and run["num_labelled"] == 4 and "resume" in run

    seen = _count_batches(monkeypatch, lambda n: None)
    report = refseg_fiftyone.core.auto_label(dataset, batch_size=2)
    assert seen["images"] == 5  # the four saved samples are not labelled again
    assert report["num_already_done"] == 4 and report["num_labelled"] == 5 and report["status"] == "completed"
    assert labelled_count(dataset) == 9 and _last_run(dataset)["status"] == "completed"


def test_ctrl_c_on_a_delegated_worker_stops_after_the_batch_and_rerun_resumes(dataset, monkeypatch):
    clear_queued_operations()
    build_toy_bank(dataset)
    queued = op("auto_label")(dataset, delegate=True, batch_size=2)

    def sigint_during_first(n):
        if n == 1:  # a real Ctrl-C: asyncio (the worker's event loop) cancels the operator's task
            os.kill(os.getpid(), signal.SIGINT)

    seen = _count_batches(monkeypatch, sigint_during_first)
    with pytest.raises(KeyboardInterrupt):
        DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    assert seen["calls"] == 1  # stopped between batches, not at the end
    assert labelled_count(dataset) == 2  # the batch in flight was finished and saved
    assert _last_run(dataset)["status"] == "interrupted"
    doc = DelegatedOperationService().get(queued["id"])
    assert doc.run_state == "failed" and "rerun" in doc.result.error  # not left running, not completed

    seen = _count_batches(monkeypatch, lambda n: None)
    DelegatedOperationService().rerun_operation(queued["id"])  # what `fiftyone delegated rerun <id>` does
    (result,) = run_queued(dataset)
    assert seen["images"] == 7 and result.result["num_already_done"] == 2 and result.result["num_labelled"] == 7
    assert labelled_count(dataset) == 9


def test_resume_leaves_labels_it_did_not_write_alone(dataset):
    build_toy_bank(dataset)
    target = dataset.match_tags("reference", bool=False).first()
    target["refseg"] = fo.Detections(detections=[fo.Detection(label="mine", bounding_box=[0, 0, 0.5, 0.5])])
    target.save()
    report = op("auto_label")(dataset)
    assert report["num_foreign_skipped"] == 1 and report["num_labelled"] == 8
    target.reload()
    assert [d.label for d in target.refseg.detections] == ["mine"]


def _draw(image, rng, box, colour, shape="rectangle"):
    layer = Image.new("L", (image.shape[1], image.shape[0]), 0)
    getattr(ImageDraw.Draw(layer), shape)(box, fill=255)
    m = np.asarray(layer) > 0
    image[m] = _noisy(rng, (int(m.sum()),), colour)
    return m


def _mislabelled_reference(root: Path, rng) -> fo.Sample:
    """A reference image with one red and one yellow shape, both annotated 'red' (the yellow by mistake)."""
    image = _noisy(rng, (160, 208), PALETTE["background"])
    red = _draw(image, rng, [20, 30, 90, 110], PALETTE["red"])
    yellow = _draw(image, rng, [120, 40, 190, 120], PALETTE["yellow"], "ellipse")
    path = root / "mislabelled_reference.png"
    Image.fromarray(image.astype(np.uint8)).save(path)
    return fo.Sample(filepath=str(path), tags=["review_ref"], ground_truth=fo.Detections(detections=[
        fo.Detection.from_mask(red, label="red"), fo.Detection.from_mask(yellow, label="red")]))


def _matches(sample, field, other_field, label=None, threshold=0.5):
    """Predictions of ``field`` overlapping an instance of ``other_field`` (optionally of one label)."""
    h, w = np.asarray(Image.open(sample.filepath)).shape[:2]
    others = [full_mask(d, h, w) for d in (sample[other_field].detections if sample[other_field] else [])
              if label is None or d.label == label]
    return [d for d in (sample[field].detections if sample[field] else [])
            if any(iou(full_mask(d, h, w), o) > threshold for o in others)]


def test_review_loop_rejected_prediction_vetoes_the_false_positives(dataset, tmp_path):
    dataset.add_sample(_mislabelled_reference(tmp_path / "images", np.random.default_rng(7)))
    build_toy_bank(dataset, reference_tag="review_ref", bank_name="review")
    targets = dataset.match_tags(["review_ref", "reference"], bool=False)
    first = op("auto_label")(targets, bank_name="review", score_threshold=0.5, cache_candidates=True)
    n_targets = first["num_targets"]
    assert first["cache"]["misses"] == n_targets and first["cache"]["hits"] == 0
    assert Path(first["cache"]["path"]).is_relative_to(os.environ["REFSEG_CANDIDATE_DIR"])

    def tally():
        yellow_fp, red_tp = [], []
        for s in dataset.match_tags(["review_ref", "reference"], bool=False):
            yellow_fp += _matches(s, "refseg", "distractors", "yellow")
            red_tp += [d for d in _matches(s, "refseg", "ground_truth", "red") if d.label == "red"]
        return yellow_fp, red_tp

    yellow_fp, red_tp = tally()
    assert len(yellow_fp) >= 2, "the mislabelled reference should make yellow shapes look red"
    assert all(d.label == "red" for d in yellow_fp) and red_tp
    n_red = len(red_tp)

    # the user rejects one of them in the App (a label tag); the bank learns a negative of 'red'
    rejected_id = yellow_fp[0].id
    dataset.select_labels(ids=[rejected_id]).tag_labels("rejected")
    update = op("update_memory_bank_from_review")(dataset, bank_name="review")
    assert update["negatives_added"] == [{"class": "red", "count": 1}] and update["references_added"] == []
    assert dataset.info["refseg_banks"]["review"]["counts"] == [{"class": "red", "references": 2, "negatives": 1}]
    assert op("update_memory_bank_from_review")(dataset, bank_name="review")["already_in_bank"] == 1

    # the bank changed, so the same auto_label call labels every target again, from the cached proposals
    # (no network): all other yellow false positives are gone (one negative vetoes them all), the rejected
    # one stays as the reviewer left it (tagged, refseg_fiftyone.review.merge_with_review), every red true
    # positive remains
    report = op("auto_label")(targets, bank_name="review", score_threshold=0.5, cache_candidates=True)
    assert report["num_labelled"] == n_targets
    assert report["cache"]["hits"] == n_targets and report["cache"]["misses"] == 0
    yellow_fp, red_tp = tally()
    assert [(d.id, d.tags) for d in yellow_fp] == [(rejected_id, ["rejected"])] and len(red_tp) == n_red

    # the cache changes nothing in the labels
    cached = {s.id: [(d.label, d.confidence, d.bounding_box) for d in s.refseg.detections] for s in targets}
    uncached = op("auto_label")(targets, bank_name="review", score_threshold=0.5, existing="overwrite")
    assert uncached["cache"] is None
    assert {s.id: [(d.label, d.confidence, d.bounding_box) for d in s.refseg.detections]
            for s in targets} == cached

    # an accepted prediction becomes a reference
    yellow_fp, red_tp = tally()
    dataset.select_labels(ids=[red_tp[0].id]).tag_labels("accepted")
    update = op("update_memory_bank_from_review")(dataset, bank_name="review")
    assert update["references_added"] == [{"class": "red", "count": 1}]
    op("auto_label")(targets, bank_name="review", score_threshold=0.5)
    yellow_fp, red_tp = tally()
    assert [d.id for d in yellow_fp] == [rejected_id] and len(red_tp) == n_red


def test_box_only_annotations(dataset):
    """Boxes -> masks with the proposer, and a bank built straight from boxes."""
    for sample in dataset:
        sample["boxes"] = fo.Detections(detections=[fo.Detection(label=d.label, bounding_box=d.bounding_box)
                                                    for d in sample.ground_truth.detections])
        sample.save()
    bank = build_toy_bank(dataset, label_field="boxes", bank_name="from_boxes")
    assert {r["class"] for r in bank["classes"] if r["used"]} == set(CLASSES) and bank["num_skipped"] == 0

    report = op("boxes_to_masks")(dataset, label_field="boxes", out_field="boxes_masked", proposer=TOY["proposer"],
                                  overrides=TOY["overrides"], device="cpu", delegate=True)
    assert report["operator"] == uri("boxes_to_masks")
    (result,) = run_queued(dataset)
    assert result.result["num_masks"] > 20 and result.result["num_failed"] == 0
    dataset.reload()
    ious = []
    for sample in dataset:
        h, w = np.asarray(Image.open(sample.filepath)).shape[:2]
        assert all(d.mask is None for d in sample.boxes.detections)  # the source field is untouched
        for gt, det in zip(sample.ground_truth.detections, sample.boxes_masked.detections):
            assert det.bounding_box == gt.bounding_box
            ious.append(iou(full_mask(gt, h, w), full_mask(det, h, w)) if det.mask is not None else 0.0)
    assert np.mean(ious) > 0.8

    # in place, immediate: only the detections without a mask change
    in_place = op("boxes_to_masks")(dataset.limit(2), label_field="boxes", proposer=TOY["proposer"],
                                    overrides=TOY["overrides"], device="cpu")
    assert in_place["num_samples"] == 2
    assert all(d.mask is not None for s in dataset.limit(2) for d in s.boxes.detections)

    report = op("auto_label")(dataset, bank_name="from_boxes", delegate=False)
    assert report["num_labelled"] == 9


# ---------------------------------------------------------------------------- bad input


def test_bad_reference_input_is_reported(dataset, tmp_path):
    build = op("build_memory_bank")
    with pytest.raises(ExecutionError, match="'no_such_field' does not exist"):
        build(dataset, label_field="no_such_field", **TOY)
    with pytest.raises(ExecutionError, match="no sample here is tagged 'golden'"):
        build(dataset, label_field="ground_truth", reference_tag="golden", **TOY)
    dataset.add_sample_field("empty_field", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    with pytest.raises(ExecutionError, match="have no instance in 'empty_field'"):
        build(dataset, label_field="empty_field", **TOY)
    with pytest.raises(ExecutionError, match="has no memory bank: .*run 'refseg: build memory bank' first"):
        op("auto_label")(dataset, bank_name="nothing")  # the form is invalid: no bank at all
    with pytest.raises(ExecutionError, match="unknown setting"):
        build(dataset, label_field="ground_truth", **{**TOY, "overrides": "proposal.no_such_knob=3"})

    # a class whose every reference is unusable, and a reference image that cannot be read
    refs = list(dataset.match_tags("reference"))
    for sample in refs[:2]:
        sample.ground_truth.detections.append(fo.Detection(label="ghost", bounding_box=[0.1, 0.1, 0.2, 0.2],
                                                           mask=np.zeros((32, 41), bool)))
        sample.save()
    broken = refs[2]
    n_broken = len(broken.ground_truth.detections)
    broken.filepath = str(tmp_path / "moved_away.png")
    broken.save()
    report = build(dataset, label_field="ground_truth", **TOY)
    rows = {r["class"]: r for r in report["classes"]}
    assert rows["ghost"]["used"] == 0 and rows["ghost"]["skipped"] == 2 and rows["ghost"]["reasons"] == ["empty mask"]
    assert report["unusable_classes"] == ["ghost"]
    assert sum(1 for s in report["skipped"] if "image not found" in s["reason"]) == n_broken
    assert all(rows[c]["used"] > 0 for c in CLASSES)
    assert dataset.info["refseg_banks"]["default"]["classes"] == sorted(CLASSES)
    with pytest.raises(ExecutionError, match="no memory bank named 'nothing' \\(banks: default\\)"):
        op("auto_label")(dataset, bank_name="nothing")

    # only unusable references: nothing is saved, and the reason says why
    with pytest.raises(ExecutionError, match="ghost: empty mask"):
        build(dataset, label_field="ground_truth", classes=["ghost"], bank_name="ghosts", **TOY)
    assert "ghosts" not in dataset.info["refseg_banks"]


def test_missing_and_corrupt_images_are_reported_and_the_rest_labelled(dataset, tmp_path):
    build_toy_bank(dataset)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    dataset.add_samples([fo.Sample(filepath=str(tmp_path / "missing.png")), fo.Sample(filepath=str(corrupt))])
    report = op("auto_label")(dataset, delegate=False)
    assert report["num_failed"] == 2 and report["num_labelled"] == 9
    errors = {Path(f["filepath"]).name: f["error"] for f in report["failed"]}
    assert "image not found" in errors["missing.png"] and "cannot read image" in errors["corrupt.png"]
    # the failed samples are retried by the next run (and fail again), nothing else is redone
    again = op("auto_label")(dataset, delegate=False)
    assert again["num_failed"] == 2 and again["num_labelled"] == 0 and again["num_already_done"] == 9
    # the exporter skips them too
    ex = op("export_coco")(dataset, label_field="refseg", export_dir=str(tmp_path / "out"))
    assert ex["num_images"] == 12 and ex["num_failed"] == 2


# ---------------------------------------------------------------------------- real delegated worker


def test_fiftyone_delegated_launch_worker_runs_the_job(dataset):
    clear_queued_operations()
    build_toy_bank(dataset)
    queued = op("auto_label")(dataset, delegate=True)
    cli = Path(sys.executable).with_name("fiftyone")
    worker = subprocess.Popen([str(cli), "delegated", "launch"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        service = DelegatedOperationService()
        deadline = time.time() + 180
        while time.time() < deadline:
            doc = service.get(queued["id"])
            if doc.run_state in ("completed", "failed"):
                break
            time.sleep(1)
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        try:
            output = worker.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            output = worker.communicate()[0]
    assert doc.run_state == "completed", f"{doc.run_state}: {doc.result}\n{output[-3000:]}"
    assert doc.result.result["num_labelled"] == 9
    dataset.reload()
    assert labelled_count(dataset) == 9


# ---------------------------------------------------------------------------- real architectures


@pytest.mark.slow
def test_workflow_with_random_weight_sam2_tiny_and_dinov2_small(tmp_path):
    dataset = make_dataset(tmp_path / "images", n_images=6, n_references=2, height=128, width=160)
    try:
        models = REAL_SMALL
        bank = op("build_memory_bank")(dataset, label_field="ground_truth", bank_name="real", **models)
        assert bank["num_references"] > 0
        record = dataset.info["refseg_banks"]["real"]
        assert record["proposer"] == "sam2.1_hiera_t" and record["encoder"] == "dinov2_vits14"

        # box-only references need the SAM2 box prompt
        for sample in dataset.match_tags("reference"):
            sample["boxes"] = fo.Detections(detections=[fo.Detection(label=d.label, bounding_box=d.bounding_box)
                                                        for d in sample.ground_truth.detections])
            sample.save()
        boxed = op("build_memory_bank")(dataset, label_field="boxes", bank_name="real_boxes", **models)
        assert boxed["num_references"] + boxed["num_skipped"] == bank["num_references"]

        op("auto_label")(dataset, bank_name="real", delegate=True)
        (result,) = run_queued(dataset)  # same seed in the worker: same random networks as the bank's
        report = result.result
        assert report["num_labelled"] == 4 and report["num_failed"] == 0
        dataset.reload()
        classes = set(record["classes"])
        for sample in dataset.exists("refseg"):
            h, w = np.asarray(Image.open(sample.filepath)).shape[:2]
            assert sample.refseg.refseg_run == report["run_key"]
            for det in sample.refseg.detections:
                assert det.label in classes and 0.0 <= det.confidence <= 1.0
                x, y, bw, bh = det.bounding_box
                assert 0 <= x and 0 <= y and x + bw <= 1 + 1e-9 and y + bh <= 1 + 1e-9
                assert det.mask.dtype == bool and det.mask.shape == (round(bh * h), round(bw * w))
                assert det.mask.any()
        assert report["num_instances"] > 0, "random networks still propose something: nothing was checked"
        ev = op("evaluate_auto_labels")(dataset, gt_field="ground_truth", eval_key="real_eval")
        assert -1.0 <= ev["mAP"] <= 1.0
        ex = op("export_coco")(dataset, label_field="refseg", export_dir=str(tmp_path / "coco"))
        assert ex["num_annotations"] == report["num_instances"]
    finally:
        dataset.delete()

"""The refseg panel's data (:mod:`refseg_fiftyone.status`) and the panel itself, on a real dataset.

A bank is built from the synthetic dataset's references, the rest auto-labelled, one
prediction tagged rejected, then evaluated; every number the panel shows is checked
against the dataset (counts recomputed from the labels, AP50 from FiftyOne's precision
array). The panel is run through FiftyOne's operator machinery as the App runs it.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

fo = pytest.importorskip("fiftyone")
import fiftyone.operators as foo  # noqa: E402
from fiftyone.operators.delegated import DelegatedOperationService  # noqa: E402

from refseg.testing import CLASSES  # noqa: E402
from refseg_fiftyone import core, status  # noqa: E402
from conftest import clear_queued_operations  # noqa: E402
from test_fiftyone_plugin import PLUGIN, build_toy_bank, make_dataset, op, run_queued  # noqa: E402

PANEL = f"{PLUGIN}/refseg_panel"


def labelled_and_reviewed(root, n_images=8):
    """bank 'default' built, the targets labelled, the first prediction rejected, two accepted, evaluated."""
    dataset = make_dataset(root, n_images=n_images)
    build_toy_bank(dataset)
    op("auto_label")(dataset, score_threshold=0.5, delegate=False)
    ids = [d.id for s in dataset.exists("refseg") for d in s.refseg.detections]
    dataset.select_labels(ids=ids[:1]).tag_labels(core.DEFAULT_REJECTED_TAG)
    dataset.select_labels(ids=ids[1:3]).tag_labels(core.DEFAULT_ACCEPTED_TAG)
    report = op("evaluate_auto_labels")(dataset, gt_field="ground_truth")
    return dataset, report


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    dataset, report = labelled_and_reviewed(tmp_path_factory.mktemp("status") / "images")
    yield dataset, report
    dataset.delete()


def test_evaluation_reports_and_stores_ap_ap50_and_map(reviewed):
    dataset, report = reviewed
    results = dataset.load_evaluation_results(core.DEFAULT_EVAL_KEY)
    i50 = int(np.where(np.isclose(results.iou_threshs, 0.5))[0][0])
    assert len(results.iou_threshs) == 10  # mAP averages ten thresholds, whatever the form's IoU
    for i, c in enumerate(results.classes):
        entry = next(e for e in report["classes"] if e["class"] == c)
        assert entry["AP"] == pytest.approx(float(np.mean(results.precision[:, i, :])))
        assert entry["AP50"] == pytest.approx(float(np.mean(results.precision[i50, i, :])))
        assert entry["AP50"] >= entry["AP"]  # precision does not grow with the IoU threshold
    assert report["mAP"] == pytest.approx(results.mAP())
    assert report["mAP50"] == pytest.approx(np.mean([e["AP50"] for e in report["classes"] if e["AP50"] > -1]))
    assert report["mAP50"] > report["mAP"] > 0.5
    assert report["iou"] == 0.5 and report["pred_field"] == "refseg" and report["gt_field"] == "ground_truth"
    # stored: the same report in dataset.info, after a reload from the database
    dataset.reload()
    assert dataset.info[core.EVALS_KEY][core.DEFAULT_EVAL_KEY] == {k: v for k, v in report.items() if k != "summary"}
    # the dialog names the metric for what it is and shows AP50 per class
    summary = report["summary"]
    assert "mAP@[.50:.95]" in summary and "AP50" in summary and "at IoU 0.5" in summary
    for c in report["classes"]:
        if c["AP"] >= 0:
            assert f"| {c['class']} | {c['AP']:.3f} | {c['AP50']:.3f} |" in summary
    assert "mAP **" not in summary


def test_status_of_banks_runs_review_and_evaluation(reviewed):
    dataset, report = reviewed
    info = status.dataset_status(dataset)
    assert info["dataset"] == dataset.name

    # banks: per class, positives = the reference samples' ground truth instances, no negatives yet
    (bank,) = info["banks"]
    refs = dataset.match_tags("reference")
    expected = {c: refs.count_values("ground_truth.detections.label").get(c, 0) for c in CLASSES}
    assert {c["class"]: c["positives"] for c in bank["counts"]} == expected
    assert all(c["negatives"] == 0 for c in bank["counts"]) and bank["error"] is None
    # thumbnails: up to 3 positives per class, each the sample file and the box of that ground truth label
    by_class = {}
    for ref in bank["references"]:
        by_class[ref["class"]] = by_class.get(ref["class"], 0) + 1
        sample = dataset[ref["sample_id"]]
        det = next(d for d in sample.ground_truth.detections if d.id == ref["label_id"])
        assert ref["filepath"] == sample.filepath and ref["field"] == "ground_truth"
        assert ref["bounding_box"] == pytest.approx(det.bounding_box) and det.label == ref["class"]
        assert not ref["negative"]
    assert by_class == {c: min(3, n) for c, n in expected.items() if n}

    # runs: the one auto_label run; no delegated job
    (run,) = info["runs"]
    targets = len(dataset) - len(refs)
    assert run["label_field"] == "refseg" and run["status"] == "completed" and run["bank"] == "default"
    assert (run["done"], run["total"], run["failed"], run["devices"]) == (targets, targets, 0, ["cpu"])
    assert info["jobs"] == []

    # review: 1 rejected, 2 accepted out of every prediction
    n_predictions = dataset.count("refseg.detections")
    assert info["review"] == [{"field": "refseg", "predictions": n_predictions, "rejected": 1, "accepted": 2}]

    # the last evaluation is the stored report
    assert info["evaluation"] == {k: v for k, v in report.items() if k != "summary"}


def test_last_evaluation_is_the_newest_and_deleted_ones_are_not_shown(reviewed):
    dataset, report = reviewed
    boxes = op("evaluate_auto_labels")(dataset, gt_field="ground_truth", eval_key="boxes_eval", use_masks=False)
    try:
        assert status.last_evaluation(dataset)["eval_key"] == "boxes_eval"
        assert status.last_evaluation(dataset)["mAP"] == pytest.approx(boxes["mAP"])
    finally:
        dataset.delete_evaluation("boxes_eval")
    assert status.last_evaluation(dataset)["eval_key"] == core.DEFAULT_EVAL_KEY


def test_negatives_from_review_and_a_queued_job_are_shown(tmp_path):
    dataset, _ = labelled_and_reviewed(tmp_path / "images", n_images=5)
    try:
        rejected = dataset.filter_labels("refseg", fo.ViewField("tags").contains(core.DEFAULT_REJECTED_TAG))
        (det,) = [d for s in rejected for d in s.refseg.detections]
        op("update_memory_bank_from_review")(dataset, device="cpu")
        clear_queued_operations()
        queued = foo.execute_operator(f"{PLUGIN}/auto_label", ctx=dict(dataset=dataset, params=dict(
            label_field="second", delegate=True)))
        assert queued.delegated
        info = status.dataset_status(dataset)
        counts = {c["class"]: c for c in info["banks"][0]["counts"]}
        assert counts[det.label]["negatives"] == 1
        (negative,) = [r for r in info["banks"][0]["references"] if r["negative"]]
        assert (negative["label_id"], negative["field"], negative["review"]) == (det.id, "refseg", "rejected")
        (job,) = info["jobs"]
        assert (job["id"], job["operator"], job["state"], job["label_field"]) == (
            str(queued.result["id"]), "auto_label", "queued", "second")
        DelegatedOperationService().set_running(doc_id=queued.result["id"])
        DelegatedOperationService().set_progress(queued.result["id"], {"progress": 0.25, "label": "1/4"})
        (job,) = status.active_jobs(dataset)
        assert (job["state"], job["progress"], job["progress_label"]) == ("running", 0.25, "1/4")
    finally:
        DelegatedOperationService().delete_operation(queued.result["id"])
        dataset.delete()


def test_thumbnail_is_the_crop_around_the_box(reviewed):
    dataset, _ = reviewed
    ref = status.dataset_status(dataset)["banks"][0]["references"][0]
    uri = status.thumbnail_uri(ref["filepath"], ref["bounding_box"], size=96, margin=0.0)
    assert uri.startswith("data:image/png;base64,")
    crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    image = np.asarray(Image.open(ref["filepath"]).convert("RGB"))
    h, w = image.shape[:2]
    x, y, bw, bh = ref["bounding_box"]
    assert max(crop.shape[:2]) <= 96
    assert abs(crop.shape[1] - round(bw * w)) <= 1 and abs(crop.shape[0] - round(bh * h)) <= 1
    # the crop's centre is the instance's colour, as in the image at the box centre
    centre = image[int((y + bh / 2) * h), int((x + bw / 2) * w)]
    assert np.abs(crop[crop.shape[0] // 2, crop.shape[1] // 2].astype(int) - centre).max() < 40
    assert status.thumbnail_uri(str(dataset.first().filepath) + ".missing", ref["bounding_box"]) is None


def _panel_event(dataset, method: str) -> dict:
    """Run the panel's ``method`` as the App does (its operator with ``__method__``); returns what it sends
    back to the App: the panel data and state patches, merged, and the rendered layout."""
    import pydash

    result = foo.execute_operator(PANEL, ctx=dict(dataset=dataset, params=dict(
        __method__=method, panel_id="test-panel", state={}, event_args={})))
    assert result.error is None, result.error
    sent = {"data": {}, "state": {}, "output": None}
    for request in result.executor.to_json()["requests"]:
        params = request["params"]
        if request["operator_uri"] in ("patch_panel_data", "patch_panel_state"):
            for k, v in params["data"].items() if "data" in params else params["state"].items():
                pydash.set_(sent["data" if request["operator_uri"] == "patch_panel_data" else "state"], k, v)
        elif request["operator_uri"] == "show_panel_output":
            sent["output"] = params["output"]
    return sent


def test_panel_renders_banks_runs_review_and_evaluation(reviewed):
    dataset, report = reviewed
    panel = foo.get_operator(PANEL)
    assert isinstance(panel, foo.Panel) and panel.config.label == "refseg"
    for method in ("on_load", "refresh"):
        sent = _panel_event(dataset, method)
        data = sent["data"]
        assert {c["class"]: c["positives"] for c in data["bank_0_counts"]} == {
            c: str(n) for c, n in dataset.match_tags("reference").count_values(
                "ground_truth.detections.label").items()}
        assert data["review"] == [{"field": "refseg", "predictions": str(dataset.count("refseg.detections")),
                                   "rejected": "1", "accepted": "2"}]
        targets = len(dataset.match_tags("reference", bool=False))
        assert data["runs"] == [{"field": "refseg", "status": "completed", "done": f"{targets}/{targets}",
                                 "failed": "0", "device": "cpu", "bank": "default"}]
        assert data["evaluation"] == [{"class": c["class"], "ap": f"{c['AP']:.3f}" if c["AP"] >= 0 else "n/a",
                                       "ap50": f"{c['AP50']:.3f}" if c["AP50"] >= 0 else "n/a"}
                                      for c in report["classes"]]
        images = data["bank_0_refs"]
        assert images and all(v["image"].startswith("data:image/png;base64,") for v in images.values())
        assert sent["state"]["outline"]["evaluation"]["eval_key"] == core.DEFAULT_EVAL_KEY

        props = sent["output"]["type"]["properties"]
        assert props["refresh"]["view"]["operator"].endswith("refseg_panel#refresh")
        assert [c["label"] for c in props["evaluation"]["view"]["columns"]] == ["Class", "AP@[.50:.95]", "AP50"]
        summary = props["eval_summary"]["default"]
        assert f"**mAP@[.50:.95]** {report['mAP']:.3f}" in summary
        assert f"**mAP50** {report['mAP50']:.3f}" in summary
        refs = props["bank_0_refs"]["type"]["properties"]
        assert set(refs) == set(images)
        assert all(r["type"]["properties"]["image"]["view"]["name"] == "ImageView" for r in refs.values())


def _requests(result) -> list[tuple[str, dict]]:
    return [(r["operator_uri"], r["params"]) for r in result.executor.to_json()["requests"]]


def _poll(dataset, state=None):
    result = foo.execute_operator(PANEL, ctx=dict(dataset=dataset, params=dict(
        __method__="poll", panel_id="test-panel", panel_state=state or {}, event_args={})))
    assert result.error is None, result.error
    return _requests(result)


def test_delegated_jobs_that_end_are_announced_once(tmp_path):
    """The panel watches queued jobs with a timer and announces each job's end once, with its summary; a job
    that fails is announced as an error with the rerun command, here by the operator the App runs when a
    dataset opens."""
    dataset = make_dataset(tmp_path / "images", n_images=5)
    build_toy_bank(dataset)
    clear_queued_operations()
    service = DelegatedOperationService()
    queued = []
    try:
        queued.append(foo.execute_operator(f"{PLUGIN}/auto_label", ctx=dict(dataset=dataset, params=dict(
            label_field="second", delegate=True))).result["id"])
        sent = _panel_event(dataset, "on_load")
        timer = sent["output"]["type"]["properties"]["jobs_timer"]["view"]
        assert (timer["name"], timer["interval"]) == ("TimerView", 5000)
        assert timer["on_interval"].endswith("refseg_panel#poll")
        assert "notify" not in [uri for uri, _ in _poll(dataset)]  # still queued: nothing to say
        # the same jobs as the panel shows: only the runs table (progress) is sent again
        light = _poll(dataset, state={"outline": sent["state"]["outline"]})
        assert [(uri, sorted(params.get("data") or params.get("state"))) for uri, params in light
                if uri.startswith("patch_panel")] == [
            ("patch_panel_data", ["runs"])]

        run_queued(dataset)
        requests = _poll(dataset)
        notices = [params for uri, params in requests if uri == "notify"]
        assert len(notices) == 1 and notices[0]["variant"] == "success"
        labelled = len(dataset.exists("second"))
        assert labelled == len(dataset.match_tags("reference", bool=False))
        assert notices[0]["message"].startswith("refseg: delegated auto-label into 'second' completed: "
                                                f"Labelled {labelled} sample(s) into 'second'")
        assert [uri for uri, _ in requests if "reload" in uri or "refresh" in uri] == [
            "reload_dataset", f"{PLUGIN}/refresh_sample_views"]
        assert "notify" not in [uri for uri, _ in _poll(dataset)]  # announced once
        idle = _panel_event(dataset, "on_load")["output"]["type"]["properties"]["jobs_timer"]["view"]
        assert idle["interval"] == 15000  # nothing to watch: a slower look for jobs queued later

        # a job that fails (its bank file gone) is announced by the operator the App runs on dataset open
        bank = core.bank_path(dataset, "default")
        queued.append(foo.execute_operator(f"{PLUGIN}/auto_label", ctx=dict(dataset=dataset, params=dict(
            label_field="third", delegate=True))).result["id"])
        bank.rename(bank.with_suffix(".moved"))
        (failed,) = service.execute_queued_operations(dataset_name=dataset.name)
        assert failed.error
        announcer = foo.get_operator(f"{PLUGIN}/announce_ended_jobs")
        assert announcer.config.on_dataset_open and announcer.config.unlisted
        result = foo.execute_operator(announcer.uri, ctx=dict(dataset=dataset, params={}))
        (notice,) = [params for uri, params in _requests(result) if uri == "notify"]
        assert notice["variant"] == "error"
        assert notice["message"].startswith("refseg: delegated auto-label into 'third' failed: ")
        assert f"`fiftyone delegated rerun {queued[1]}` resumes it" in notice["message"]
        again = foo.execute_operator(announcer.uri, ctx=dict(dataset=dataset, params={}))
        assert again.result == {"announced": 0}
    finally:
        for job in queued:
            service.delete_operation(job)
        dataset.delete()


def test_only_recent_unannounced_jobs_are_announced(tmp_path):
    """An ended job older than ANNOUNCE_WITHIN is not announced (a first look at an old dataset stays quiet)."""
    from datetime import datetime, timezone

    dataset = make_dataset(tmp_path / "images", n_images=4)
    build_toy_bank(dataset)
    clear_queued_operations()
    job = foo.execute_operator(f"{PLUGIN}/auto_label", ctx=dict(dataset=dataset, params=dict(
        label_field="second", delegate=True))).result["id"]
    try:
        run_queued(dataset)

        class Store(dict):  # the execution store's two calls used here
            def set(self, key, value):
                self[key] = value

        later = datetime.now(timezone.utc) + status.ANNOUNCE_WITHIN + status.timedelta(minutes=1)
        assert status.take_job_end_notices(dataset, Store(), now=later) == []
        store = Store()
        (notice,) = status.take_job_end_notices(dataset, store)
        assert (notice["id"], notice["state"], store[status.ANNOUNCED_KEY]) == (str(job), "completed", [str(job)])
        assert status.take_job_end_notices(dataset, store) == []
    finally:
        DelegatedOperationService().delete_operation(job)
        dataset.delete()

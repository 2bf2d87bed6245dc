"""The operators' forms: what they refuse before a run starts, the expected-time delegation rule, errors
during an App run turned into a notification (issue 11, points 1, 3 and 7)."""

from __future__ import annotations

import asyncio

import pytest

fo = pytest.importorskip("fiftyone")
from fiftyone.operators.executor import ExecutionContext, Executor  # noqa: E402

import refseg_fiftyone.core as core  # noqa: E402
from test_fiftyone_plugin import build_toy_bank, make_dataset, op, uri  # noqa: E402


@pytest.fixture()
def dataset(tmp_path):
    ds = make_dataset(tmp_path / "images")
    yield ds
    ds.delete()


def app_ctx(dataset, operator: str = "auto_label", view=None, **params) -> ExecutionContext:
    """A context as the App sends it (its requests name the operator)."""
    return ExecutionContext(request_params=dict(operator_uri=uri(operator), dataset_name=dataset.name, view=view,
                                                params=params), executor=Executor())


def form(operator: str, dataset, **params) -> dict:
    return op(operator).resolve_input(app_ctx(dataset, operator, **params)).type.properties


def invalid(properties: dict) -> dict:
    return {name: prop.error_message for name, prop in properties.items() if prop.invalid}


def test_auto_label_without_a_bank_is_an_invalid_form(dataset):
    properties = form("auto_label", dataset)
    assert "build memory bank" in invalid(properties)["no_bank"]


@pytest.mark.parametrize("overrides, named", [("merge.top_kk=50", "top_kk"), ("merge.top_k=lots", "top_k"),
                                              ("merge.top_k", "key=value")])
def test_a_bad_override_marks_the_field_invalid_with_the_setting_named(dataset, overrides, named):
    build_toy_bank(dataset)
    properties = form("auto_label", dataset, overrides=overrides)
    assert list(invalid(properties)) == ["overrides"] and named in properties["overrides"].error_message
    assert not invalid(form("auto_label", dataset, overrides="merge.top_k=50"))
    # the other forms with model settings too
    properties = form("build_memory_bank", dataset, label_field="ground_truth", overrides=overrides)
    assert named in invalid(properties)["overrides"]
    assert named in invalid(form("boxes_to_masks", dataset, label_field="ground_truth", overrides=overrides))[
        "overrides"]


def test_missing_checkpoint_while_offline_and_a_bad_device_are_refused(dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("REFSEG_OFFLINE", "1")
    monkeypatch.setenv("REFSEG_CACHE_DIR", str(tmp_path / "empty-cache"))
    properties = form("build_memory_bank", dataset, label_field="ground_truth", proposer="sam2.1_hiera_t",
                      encoder="refseg.testing:ColorEncoder")
    message = invalid(properties)["proposer_checkpoint"]
    assert "sam2.1_hiera_tiny.pt" in message and "offline" in message and "random weights" in message
    # random weights need no checkpoint; the form then says the labels are meaningless
    properties = form("build_memory_bank", dataset, label_field="ground_truth", proposer="sam2.1_hiera_t",
                      encoder="refseg.testing:ColorEncoder", random_init=True)
    assert not invalid(properties) and "meaningless" in properties["random_init_warning"].view.label
    properties = form("boxes_to_masks", dataset, label_field="ground_truth",
                      proposer_checkpoint=str(tmp_path / "nope.pt"))
    assert "not found" in invalid(properties)["proposer_checkpoint"]
    properties = form("boxes_to_masks", dataset, label_field="ground_truth", proposer="refseg.testing:ColorRegionProposer",
                      device="cuda:7")
    assert "cuda:7" in invalid(properties)["device"]


def test_expected_time_scales_with_models_settings_and_images():
    spec = core.RunSpec(proposer="sam2.1_hiera_t", encoder="dinov2_vits14", preset="paper")
    default = core.expected_seconds_per_image(spec, "cpu")
    quick = core.expected_seconds_per_image(spec.with_changes(
        overrides="proposal.points_per_side=8, proposal.image_size=512", encoder_input_size=224), "cpu")
    large = core.expected_seconds_per_image(spec.with_changes(proposer="sam2.1_hiera_l", encoder="dinov2_vitl14"),
                                            "cpu")
    assert 100 < default < 300  # one 512x384 image took 229 s at these settings (issue 11)
    assert quick < 10 < default < large
    assert core.expected_seconds(spec, "cpu", 10) == pytest.approx(10 * default)
    # several devices at once share the images: the slowest device's share (5 of 9 here) sets the time
    assert core.expected_seconds(spec, "cpu", 9, devices=["cpu", "cpu"]) == pytest.approx(5 * default)
    toy = core.RunSpec(proposer="refseg.testing:ColorRegionProposer", encoder="refseg.testing:ColorEncoder")
    assert core.expected_seconds(toy, "cpu", 100) < 10


def test_delegation_follows_the_expected_time_where_jobs_can_be_scheduled(dataset, monkeypatch):
    build_toy_bank(dataset)
    auto = op("auto_label")
    monkeypatch.setattr(fo.config, "allow_legacy_orchestrators", True)
    # toy models: 9 targets are a few seconds, immediate
    assert auto.resolve_delegation(app_ctx(dataset)) is False
    assert form("auto_label", dataset)["delegate"].default is False
    # the same 9 targets with SAM2-L on a CPU take half an hour: delegated
    info = dataset.info
    info["refseg_banks"]["default"]["models"].update(proposer="sam2.1_hiera_l", encoder="dinov2_vitl14", overrides=[],
                                                     encoder_input_size=None)
    dataset.info = info
    dataset.save()
    assert auto.resolve_delegation(app_ctx(dataset, device="cpu")) is True
    properties = form("auto_label", dataset, device="cpu")
    assert properties["delegate"].default is True and "Expected time" in properties["expected_time"].view.label
    assert "queues the job" in properties["delegate_notice"].view.label
    # ... and one sample with quick settings is immediate again
    one = dataset.limit(4)  # the three references and one target
    ctx = app_ctx(dataset, view=one._serialize(), scope="CURRENT_VIEW", device="cpu",
                  overrides="proposal.points_per_side=8, proposal.image_size=512")
    assert auto.resolve_delegation(ctx) is False

    # an App server without FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS cannot queue: immediate by default, and a
    # ticked delegate box is refused with what to set
    monkeypatch.setattr(fo.config, "allow_legacy_orchestrators", False)
    assert auto.resolve_delegation(app_ctx(dataset, device="cpu")) is False
    properties = form("auto_label", dataset, device="cpu")
    assert properties["delegate"].default is False and "delegate it" in properties["expected_time"].view.label
    message = invalid(form("auto_label", dataset, device="cpu", delegate=True))["delegate"]
    assert "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true" in message
    # from Python, a delegated run is queued whatever the App server's setting
    queued = auto(dataset, delegate=True)
    assert queued["id"]


def test_an_error_during_an_app_run_becomes_an_error_notification(dataset, capfd):
    build_toy_bank(dataset)
    core.bank_path(dataset, "default").unlink()  # the run fails when it loads the bank
    ctx = app_ctx(dataset, delegate=False)
    messages = list(asyncio.run(op("auto_label").execute(ctx)))
    notify = [m.body.params for m in messages if m.body.operator_uri == "notify"]
    assert len(notify) == 1 and notify[0]["variant"] == "error"
    assert "auto-label failed" in notify[0]["message"] and "run auto-label again" in notify[0]["message"]
    assert "Traceback" in capfd.readouterr().err  # and in the server's log


def test_the_auto_label_form_shows_how_the_last_run_ended(dataset):
    build_toy_bank(dataset)
    op("auto_label")(dataset, delegate=False)
    dataset.reload()
    label = form("auto_label", dataset)["last_run"].view.label
    assert "completed" in label and "9 labelled" in label
    info = dataset.info
    info["refseg_runs"]["refseg"].update(status="failed", error="OSError: disk full")
    dataset.info = info
    dataset.save()
    view = form("auto_label", dataset)["last_run"].view
    assert "failed" in view.label and "disk full" in view.description


def test_auto_label_devices_that_do_not_exist_are_refused_in_the_form(dataset):
    build_toy_bank(dataset)
    properties = form("auto_label", dataset, devices="cuda:5")
    assert "cuda:5" in invalid(properties)["devices"]
    assert "devices" not in invalid(form("auto_label", dataset, devices="cpu"))


def test_calibrate_form_estimates_its_run_and_the_quick_forms_claim_no_time(dataset, monkeypatch):
    build_toy_bank(dataset)
    properties = form("calibrate_thresholds", dataset, device="cpu")
    assert "Expected time" in properties["expected_time"].view.label and not invalid(properties)
    # the bank's models on the 3 reference samples: SAM2-L on a CPU is long, delegated where jobs can be queued
    info = dataset.info
    info["refseg_banks"]["default"]["models"].update(proposer="sam2.1_hiera_l", encoder="dinov2_vitl14", overrides=[],
                                                     encoder_input_size=None)
    dataset.info = info
    dataset.save()
    monkeypatch.setattr(fo.config, "allow_legacy_orchestrators", True)
    properties = form("calibrate_thresholds", dataset, device="cpu")
    assert properties["delegate"].default is True and "min" in properties["expected_time"].view.label
    assert op("calibrate_thresholds").resolve_delegation(app_ctx(dataset, "calibrate_thresholds", device="cpu"))
    # finding corrections reads the database only, and remasking has no estimate: no "about 0 s"
    for operator in ("find_corrections", "remask_boxes"):
        properties = form(operator, dataset, label_field="ground_truth")
        assert "expected_time" not in properties and properties["delegate"].default is False


def test_review_form_counts_the_corrected_labels_it_would_use(dataset):
    build_toy_bank(dataset)
    op("auto_label")(dataset, score_threshold=0.5, delegate=False)
    notice = form("update_memory_bank_from_review", dataset)["review_counts"]
    assert isinstance(notice.view, fo.operators.types.Warning) and "Nothing to add" in notice.view.description
    sample = dataset.exists("refseg").first()
    sample.refseg.detections[0].tags = ["corrected"]
    sample.refseg.detections[1].tags = ["rejected"]
    sample.save()
    label = form("update_memory_bank_from_review", dataset)["review_counts"].view.label
    assert label.startswith("1 rejected, 0 accepted, 1 corrected") and "left out: tick" in label
    notice = form("update_memory_bank_from_review", dataset, use_corrected=True)["review_counts"]
    assert notice.view.label == "1 rejected, 0 accepted, 1 corrected"
    assert isinstance(notice.view, fo.operators.types.Notice)

"""The plugin's side of bad and incomplete input (tests/test_bad_input.py has the CLI's): images over the
pixel limit among the references and the targets, classes without annotation, box-only references whose box
cannot prompt a mask, an interrupted COCO export; and the operators' choices and defaults come from refseg's
registries and one constants block."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

fo = pytest.importorskip("fiftyone")
import refseg_fiftyone.core as core  # noqa: E402

from refseg.io.images import MAX_PIXELS_ENV  # noqa: E402
from refseg.method.config import PRESETS  # noqa: E402
from refseg.method.references import NO_ANNOTATION  # noqa: E402
from refseg.models.dinov2_encoder import DINOV2_VARIANTS
from refseg.models.registry import encoder_names  # noqa: E402
from refseg.models.sam2_proposer import SAM2_VARIANTS  # noqa: E402
from refseg.testing import CLASSES, draw_scene  # noqa: E402
from test_fiftyone_plugin import TOY, build_toy_bank, make_dataset, op  # noqa: E402

LIMIT = 100_000  # pixels: the 208x160 scenes pass, a 400x300 image does not


@pytest.fixture()
def dataset(tmp_path):
    ds = make_dataset(tmp_path / "images", n_images=6, n_references=3)
    yield ds
    ds.delete()


def _big_scene(path: Path, seed: int = 7) -> list:
    """A 400x300 scene (over LIMIT) and its annotations."""
    image, instances = draw_scene(np.random.default_rng(seed), 300, 400, 4)
    Image.fromarray(image).save(path)
    return [fo.Detection.from_mask(x["mask"], label=x["class_name"]) for x in instances if x["class_name"] in CLASSES]


def test_a_reference_image_over_the_pixel_limit_is_skipped_naming_it(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, str(LIMIT))
    big = tmp_path / "huge_reference.png"
    dets = _big_scene(big)
    dataset.add_sample(fo.Sample(filepath=str(big), tags=["reference"], ground_truth=fo.Detections(detections=dets)))
    report = build_toy_bank(dataset)
    over = [s for s in report["skipped"] if "huge_reference.png" in s["reason"]]
    assert len(over) == len(dets) and all("over the limit" in s["reason"] for s in over)
    assert "huge_reference.png" in report["summary"]
    assert all(r["used"] > 0 for r in report["classes"] if r["class"] in CLASSES)  # the good references are used
    assert report["num_references"] == sum(len(s.ground_truth.detections) for s in dataset.match_tags("reference")
                                           if s.filepath != str(big))


def test_a_target_over_the_pixel_limit_fails_alone_naming_it(dataset, tmp_path, monkeypatch):
    build_toy_bank(dataset)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(LIMIT))
    big = tmp_path / "huge_target.png"
    _big_scene(big)
    dataset.add_sample(fo.Sample(filepath=str(big)))
    report = op("auto_label")(dataset, delegate=False)
    assert report["num_failed"] == 1 and report["num_labelled"] == 3  # the six scenes less three references
    assert Path(report["failed"][0]["filepath"]).name == "huge_target.png"
    assert "over the limit" in report["failed"][0]["error"]
    assert "huge_target.png" in report["summary"] and "1 failed" in report["summary"]
    assert len(dataset.exists("refseg")) == 3 and not dataset.match(fo.ViewField("filepath") == str(big)).exists(
        "refseg")


def test_a_declared_class_without_annotation_is_reported(dataset):
    dataset.classes = {"ground_truth": [*CLASSES, "unicorn"]}  # e.g. every category of an imported COCO file
    dataset.save()
    report = build_toy_bank(dataset)
    assert report["missing_classes"] == ["unicorn"] and report["unusable_classes"] == []
    rows = {r["class"]: r for r in report["classes"]}
    assert rows["unicorn"]["used"] == 0 and rows["unicorn"]["reasons"] == [NO_ANNOTATION]
    assert "no annotation on the reference samples: unicorn" in report["summary"]
    assert "unicorn" not in dataset.info["refseg_banks"]["default"]["classes"]
    # a requested class absent from the references is reported the same way
    report = build_toy_bank(dataset, classes=[CLASSES[0], "dragon"], bank_name="two")
    assert report["missing_classes"] == ["dragon"]


def test_the_proposer_is_not_built_when_every_box_only_reference_is_unusable(dataset):
    refs = list(dataset.match_tags("reference"))
    for sample in refs[:2]:  # box-only references whose box lies outside the image
        sample.ground_truth.detections.append(fo.Detection(label=CLASSES[0], bounding_box=[1.2, 1.1, 0.1, 0.1]))
        sample.save()
    missing_proposer = {**TOY, "proposer": "refseg.testing:NoSuchProposer"}  # building it would fail
    report = build_toy_bank(dataset, **missing_proposer)
    outside = [s for s in report["skipped"] if "outside" in s["reason"]]
    assert len(outside) == 2 and all(s["reason"].startswith("unusable box") for s in outside)

    # one usable box-only reference: now the proposer is needed, and its absence is the error
    good = refs[2].ground_truth.detections[0]
    refs[2].ground_truth.detections.append(fo.Detection(label=good.label, bounding_box=list(good.bounding_box)))
    refs[2].save()
    with pytest.raises(Exception, match="NoSuchProposer"):
        build_toy_bank(dataset, bank_name="needs_proposer", **missing_proposer)
    assert build_toy_bank(dataset, bank_name="with_proposer")["num_references"] > 0


def test_an_interrupted_export_leaves_the_previous_labels_file(dataset, tmp_path, monkeypatch):
    export_dir = tmp_path / "export"
    first = op("export_coco")(dataset, label_field="ground_truth", export_dir=str(export_dir))
    labels = Path(first["labels_path"])
    before = labels.read_bytes()

    def dump(obj, fh, **kwargs):
        fh.write('{"info": ')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(OSError, match="disk full"):
        core.export_coco(dataset.limit(2), label_field="ground_truth", export_dir=str(export_dir))
    assert labels.read_bytes() == before and len(json.loads(before)["images"]) == len(dataset)
    assert sorted(p.name for p in export_dir.iterdir()) == ["labels.json"]


def test_choices_come_from_the_registries_and_defaults_are_written_once():
    import fiftyone_plugin as plugin

    assert set(plugin.PROPOSER_CHOICES) == set(SAM2_VARIANTS) and plugin.PROPOSER_CHOICES[0] == core.DEFAULT_PROPOSER
    assert set(plugin.ENCODER_CHOICES) == set(encoder_names()) >= set(DINOV2_VARIANTS)
    assert plugin.ENCODER_CHOICES[0] == core.DEFAULT_ENCODER
    assert plugin.PRESET_CHOICES == tuple(PRESETS) and core.DEFAULT_PRESET in PRESETS
    # the operators' Python signatures and the functions they call share the defaults
    pairs = [(plugin.BuildMemoryBank, core.build_memory_bank, ("bank_name", "reference_tag", "batch_size")),
             (plugin.EvaluateAutoLabels, core.evaluate_auto_labels, ("pred_field", "eval_key", "reference_tag", "iou")),
             (plugin.ExportCoco, core.export_coco, ("mask_format",)),
             (plugin.UpdateMemoryBankFromReview, core.update_memory_bank_from_review,
              ("bank_name", "pred_field", "rejected_tag", "accepted_tag"))]
    for operator, function, names in pairs:
        theirs = inspect.signature(operator.__call__).parameters
        ours = inspect.signature(function).parameters
        for name in names:
            assert theirs[name].default == ours[name].default, (operator.__name__, name)

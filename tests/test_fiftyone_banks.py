"""Banks belong to one dataset: files keyed by the dataset's id, a clone's own copy on its first change, no
file shared silently between datasets, old-style records still read, and delete_bank deleting only files no
other record uses."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

fo = pytest.importorskip("fiftyone")
import refseg_fiftyone.core as core  # noqa: E402
from fiftyone.operators.executor import ExecutionError  # noqa: E402

from refseg.testing import CLASSES  # noqa: E402
from test_fiftyone_plugin import build_toy_bank, make_dataset, op  # noqa: E402


@pytest.fixture()
def datasets():
    """Datasets made by a test, deleted after it."""
    made = []
    yield made
    for ds in made:
        if not ds.deleted:
            ds.delete()


@pytest.fixture()
def original(tmp_path, datasets):
    ds = make_dataset(tmp_path / "images", n_images=6, n_references=3)
    datasets.append(ds)
    return ds


def clone_of(dataset, datasets):
    clone = dataset.clone(f"{dataset.name}-clone{len(datasets)}")
    datasets.append(clone)
    return clone


def labels_of(dataset, field="refseg") -> dict:
    return {s.id: sorted((d.label, round(d.confidence, 6), tuple(d.bounding_box)) for d in s[field].detections)
            for s in dataset.exists(field)}


def reject_one_prediction(dataset) -> None:
    """Label the dataset and tag one prediction ``rejected``, as a reviewer in the App would."""
    op("auto_label")(dataset, delegate=False)
    first = next(d for s in dataset.exists("refseg") for d in s.refseg.detections)
    dataset.select_labels(ids=[first.id]).tag_labels("rejected")


def test_datasets_whose_names_give_the_same_slug_have_their_own_files(tmp_path, datasets):
    prefix = uuid.uuid4().hex[:8]
    made = {}
    for name, classes in ((f"{prefix} a#x", CLASSES[:1]), (f"{prefix} a x", CLASSES[1:2])):
        ds = make_dataset(tmp_path / name.replace(" ", "_").replace("#", "_"), n_images=5, n_references=2)
        datasets.append(ds)
        ds.name = name
        build_toy_bank(ds, classes=list(classes))
        made[name] = (ds, classes)
    paths = [core.bank_record(ds, "default")["path"] for ds, _ in made.values()]
    assert len(set(paths)) == 2 and all(Path(p).is_file() for p in paths)
    for ds, classes in made.values():
        record = core.bank_record(ds, "default")
        assert record["owner_id"] == str(ds._doc.id) and Path(record["path"]) == core.bank_path(ds, "default")
        report = op("auto_label")(ds, delegate=False)
        assert report["num_labelled"] == 3
        assert {d.label for s in ds.exists("refseg") for d in s.refseg.detections} == set(classes)


def test_bank_names_whose_slugs_agree_have_their_own_files(original):
    assert core.bank_path(original, "x#y") != core.bank_path(original, "x y")
    assert core.bank_path(original, "default").name == "default.safetensors"


def test_a_clone_updating_from_review_leaves_the_original_bank_alone(original, datasets):
    build_toy_bank(original)
    op("auto_label")(original, delegate=False)
    before = labels_of(original)
    original_record = core.bank_record(original, "default")
    original_file = Path(original_record["path"])
    original_bytes = original_file.read_bytes()

    clone = clone_of(original, datasets)
    assert core.bank_record(clone, "default")["path"] == str(original_file)  # inherited: read, not written
    reject_one_prediction(clone)
    update = op("update_memory_bank_from_review")(clone, bank_name="default")
    assert update["num_added"] == 1

    clone_record = core.bank_record(clone, "default")
    assert Path(clone_record["path"]) == core.bank_path(clone, "default") != original_file
    assert clone_record["owner_id"] == str(clone._doc.id) != original_record["owner_id"]
    assert Path(clone_record["path"]).is_file()
    assert original_file.read_bytes() == original_bytes
    original.reload()
    assert core.bank_record(original, "default") == original_record
    bank, _ = core.load_bank(original, "default")
    assert bank.counts(negative=True)[bank.class_names[0]] == 0 and sum(bank.counts(negative=True).values()) == 0

    # the original resumes as done with the same labels, and labels the same when forced to
    assert op("auto_label")(original, delegate=False)["num_labelled"] == 0
    op("auto_label")(original, delegate=False, existing="overwrite")
    assert labels_of(original) == before

    # a second update of the clone rewrites its own file, not the original's
    clone.select_labels(tags="rejected").untag_labels("rejected")
    reject_one_prediction(clone)
    op("update_memory_bank_from_review")(clone, bank_name="default")
    assert core.bank_record(clone, "default")["path"] == clone_record["path"]
    assert original_file.read_bytes() == original_bytes


def test_the_original_rewriting_a_shared_file_makes_the_clone_refuse_it(original, datasets):
    build_toy_bank(original)
    clone = clone_of(original, datasets)
    core.load_bank(clone, "default")  # the shared file, as recorded: fine to read

    build_toy_bank(original, classes=CLASSES[:1])  # the original rebuilds its bank in place
    with pytest.raises(ValueError, match=f"file of dataset '{original.name}'.*build_memory_bank"):
        core.load_bank(clone, "default")
    with pytest.raises(ExecutionError, match="no longer this dataset's bank"):
        op("auto_label")(clone, delegate=False)
    assert not clone.exists("refseg")

    # building again on the clone gives it its own file
    build_toy_bank(clone)
    bank, record = core.load_bank(clone, "default")
    assert Path(record["path"]) == core.bank_path(clone, "default")
    assert set(bank.class_names) == set(CLASSES)
    assert list(core.load_bank(original, "default")[0].class_names) == list(CLASSES[:1])


def test_a_clone_with_its_own_copy_is_unaffected_by_the_original(original, datasets):
    build_toy_bank(original)
    clone = clone_of(original, datasets)
    reject_one_prediction(clone)
    op("update_memory_bank_from_review")(clone, bank_name="default")
    clone_bytes = Path(core.bank_record(clone, "default")["path"]).read_bytes()

    build_toy_bank(original, classes=CLASSES[:1])
    bank, _ = core.load_bank(clone, "default")
    assert set(bank.class_names) == set(CLASSES) and sum(bank.counts(negative=True).values()) == 1
    assert Path(core.bank_record(clone, "default")["path"]).read_bytes() == clone_bytes


def _make_old_style(dataset, bank_name="default") -> Path:
    """Move the bank to where it was filed before files had owners, with a record as it was then."""
    record = dict(core.bank_record(dataset, bank_name))
    legacy = core.bank_dir(dataset) / core._slug(dataset.name) / f"{bank_name}.safetensors"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(record["path"], legacy)
    record["path"] = str(legacy)
    record.pop("owner_id")
    record.pop("owner")
    core._set_bank_record(dataset, bank_name, record)
    return legacy


def test_an_old_style_record_still_loads_and_its_next_update_gets_an_own_file(original):
    build_toy_bank(original)
    legacy = _make_old_style(original)
    legacy_bytes = legacy.read_bytes()
    bank, record = core.load_bank(original, "default")
    assert record["path"] == str(legacy) and set(bank.class_names) == set(CLASSES)

    reject_one_prediction(original)  # labels from the old file
    assert original.count("refseg.detections") > 0
    op("update_memory_bank_from_review")(original, bank_name="default")
    record = core.bank_record(original, "default")
    assert Path(record["path"]) == core.bank_path(original, "default") and record["owner_id"] == str(original._doc.id)
    assert legacy.read_bytes() == legacy_bytes  # a clone made before may still read it


def test_an_old_style_file_is_refused_when_changed(original):
    build_toy_bank(original)
    legacy = _make_old_style(original)
    legacy.write_bytes(legacy.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not the one recorded.*build the bank again"):
        core.load_bank(original, "default")


def test_delete_bank_deletes_only_files_no_other_record_uses(original, datasets):
    build_toy_bank(original)
    original_file = Path(core.bank_record(original, "default")["path"])

    # a clone's delete removes its record, not the original's file
    clone = clone_of(original, datasets)
    assert core.delete_bank(clone, "default") is None
    assert "default" not in core.list_banks(clone) and original_file.is_file()
    core.load_bank(original, "default")

    # the original's delete keeps the file while another clone's record names it
    second = clone_of(original, datasets)
    assert core.delete_bank(original, "default") is None and original_file.is_file()
    core.load_bank(second, "default")

    # a clone's own copy is its to delete
    reject_one_prediction(second)
    op("update_memory_bank_from_review")(second, bank_name="default")
    own = Path(core.bank_record(second, "default")["path"])
    assert core.delete_bank(second, "default") == own and not own.exists() and original_file.is_file()


def test_delete_bank_deletes_an_unshared_file_and_an_old_style_one(original):
    build_toy_bank(original, bank_name="new")
    new_file = Path(core.bank_record(original, "new")["path"])
    assert core.delete_bank(original, "new") == new_file and not new_file.exists()

    build_toy_bank(original)
    legacy = _make_old_style(original)
    assert core.delete_bank(original, "default") == legacy and not legacy.exists()


def test_a_moved_bank_folder_is_found_under_the_current_bank_dir(original, tmp_path, monkeypatch):
    build_toy_bank(original)
    path = Path(core.bank_record(original, "default")["path"])
    moved_root = tmp_path / "elsewhere"
    shutil.move(path.parent, moved_root / path.parent.name)
    monkeypatch.setenv(core.BANK_DIR_ENV, str(moved_root))
    _, record = core.load_bank(original, "default")
    assert core._bank_file(original, record, "default") == moved_root / path.parent.name / path.name

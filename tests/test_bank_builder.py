"""The one bank builder (:class:`refseg.method.references.BankBuilder`), box prompts as a function, and the
atomic JSON writer, with the toy models of :mod:`refseg.testing` (the plugin side is in
tests/test_fiftyone_plugin.py)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg import MemoryBank
from refseg.cli import EXIT_INCOMPLETE, main
from refseg.io.files import sha256_file, write_json_atomic
from refseg.method.references import (NO_ANNOTATION, BankBuilder, Reference, ReferenceEncoder, UnusableReference,
                                      masks_from_boxes)
from refseg.testing import ColorEncoder, ColorRegionProposer, draw_scene, make_synthetic_coco

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]


def _scene_refs(n_images: int = 3, seed: int = 0) -> list[Reference]:
    rng = np.random.default_rng(seed)
    refs = []
    for i in range(n_images):
        image, instances = draw_scene(rng, 96, 128, 4)
        refs += [Reference(image, x["class_name"], mask=x["mask"], source={"image": i, "k": k})
                 for k, x in enumerate(instances)]
    return refs


def _encoder(**kwargs) -> ReferenceEncoder:
    return ReferenceEncoder(ColorEncoder(input_size=56, patch_size=14), proposal_image_size=128, **kwargs)


def test_chunked_building_embeds_a_bounded_number_at_a_time_and_gives_the_same_bank():
    refs = _scene_refs()
    assert len(refs) > 5
    whole, whole_report = _encoder().build_bank(refs)

    ref_encoder = _encoder()
    sizes = []
    embed = ref_encoder.embed
    ref_encoder.embed = lambda chunk, batch_size=8: sizes.append(len(chunk)) or embed(chunk, batch_size)
    builder = BankBuilder(ref_encoder, batch_size=2, chunk_size=3)
    builder.add_all(refs)
    assert max(sizes) <= 3  # never more than a chunk decoded and waiting
    bank, report = builder.finish()
    assert sum(sizes) == len(refs) and max(sizes) == 3
    assert report.used == whole_report.used and len(bank) == len(whole) == len(refs)
    assert torch.equal(bank.embeddings()[0], whole.embeddings()[0])
    assert [e.source for e in bank.entries] == [r.source for r in refs]


def test_positives_negatives_and_a_class_without_annotation_are_reported():
    refs = _scene_refs(2)
    present = list(dict.fromkeys(r.class_name for r in refs))
    builder = BankBuilder(_encoder(), classes=[*present, "unicorn"])
    builder.add_all(refs[:-1])
    builder.add(refs[-1], negative=True)
    empty = Reference(refs[0].image, "ghost", mask=np.zeros(refs[0].image.shape[:2], bool), source={"id": "g"})
    builder.add(empty)
    builder.skip({"image": "gone.png"}, present[0], "image not found: gone.png")
    bank, report = builder.finish()

    assert report.negatives == {refs[-1].class_name: 1}
    assert sum(report.used.values()) == len(refs) - 1 and len(bank.counts(negative=True)) >= 1
    assert report.unannotated() == ["unicorn"] and report.unusable() == ["ghost"]
    rows = {r["class"]: r for r in report.rows()}
    assert rows["unicorn"] == {"class": "unicorn", "used": 0, "negatives": 0, "skipped": 0, "reasons": [NO_ANNOTATION]}
    assert rows["ghost"]["reasons"] == ["empty mask"] and rows["ghost"]["skipped"] == 1
    assert rows[present[0]]["reasons"] == ["image not found: gone.png"]
    assert f"unicorn: {NO_ANNOTATION}" in report.summary()


class _Factory:
    """A proposer factory that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return ColorRegionProposer()


def test_the_proposer_is_built_only_for_a_box_only_reference_with_a_usable_box():
    refs = _scene_refs(1)
    image = refs[0].image
    h, w = image.shape[:2]
    bad_boxes = [Reference(image, "a", box=(10, 10, 10, 30), source={"id": 1}),  # zero width
                 Reference(image, "a", box=(w + 5, 0, w + 20, 10), source={"id": 2}),  # outside the image
                 Reference(image, "a", box=(0, float("inf"), 5, 5), source={"id": 3})]
    factory = _Factory()
    builder = BankBuilder(_encoder(proposer_factory=factory))
    builder.add_all([*refs, *bad_boxes])
    _, report = builder.finish()
    assert factory.calls == 0 and len(report.skipped) == 3
    assert all(reason.startswith("unusable box") for _, _, reason in report.skipped)

    ys, xs = np.nonzero(refs[0].mask)  # a box-only reference with a good box: now the proposer is needed
    good = Reference(image, refs[0].class_name, box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), source={})
    builder = BankBuilder(_encoder(proposer_factory=factory))
    builder.add_all([*bad_boxes, good, good])
    _, report = builder.finish()
    assert factory.calls == 1 and report.used == {refs[0].class_name: 2}


def test_masks_from_boxes_is_the_reference_encoders_box_prompt():
    refs = _scene_refs(1)
    image = refs[0].image
    proposer = ColorRegionProposer()
    boxes = []
    for ref in refs:
        ys, xs = np.nonzero(ref.mask)
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    together = masks_from_boxes(proposer, image, boxes, 128)
    one_by_one = [_encoder(proposer=proposer).mask_from_box(image, b) for b in boxes]
    assert len(together) == len(boxes) and masks_from_boxes(proposer, image, [], 128) == []
    for mask, single, ref in zip(together, one_by_one, refs):
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert np.array_equal(mask, single)
        assert np.logical_and(mask, ref.mask).sum() / np.logical_or(mask, ref.mask).sum() > 0.8
    with pytest.raises(UnusableReference, match="no proposal model was given"):
        _encoder().mask_from_box(image, boxes[0])


# ---------------------------------------------------------------------------- CLI report


def test_cli_build_bank_reports_a_category_without_any_annotation(tmp_path, capsys):
    images, path = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    coco = json.loads(path.read_text())
    coco["categories"].append({"id": 99, "name": "unicorn"})  # declared, never annotated
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(coco))
    out = tmp_path / "bank.safetensors"
    capsys.readouterr()
    assert main(["build-bank", "--references", str(refs), "--images", str(images), "--out", str(out),
                 *PROPOSER, *TOY]) == EXIT_INCOMPLETE
    captured = capsys.readouterr()
    assert f"unicorn: 0 used ({NO_ANNOTATION})" in captured.out
    assert "have no annotation" in captured.err and "unicorn" in captured.err and "incomplete bank" in captured.err
    assert "unicorn" not in MemoryBank.load(out).class_names
    # selecting the annotated classes leaves it out: a complete bank
    names = ",".join(c["name"] for c in coco["categories"] if c["id"] != 99)
    assert main(["build-bank", "--references", str(refs), "--images", str(images), "--out", str(out),
                 "--classes", names, *PROPOSER, *TOY]) == 0
    assert "unicorn" not in capsys.readouterr().out


# ---------------------------------------------------------------------------- files


def _failing_dump(monkeypatch):
    """json.dump writes part of the document, then fails (as a crash or an unserialisable value would)."""
    def dump(obj, fh, **kwargs):
        fh.write('{"images": [')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dump)


def test_atomic_json_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "labels.json"
    write_json_atomic(path, {"old": True}, indent=1)
    before = path.read_bytes()
    _failing_dump(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"new": True})
    assert path.read_bytes() == before and json.loads(before) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json"]  # no temporary file left


def test_cli_sample_output_is_written_atomically(tmp_path, monkeypatch, capsys):
    _, path = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    out = tmp_path / "refs.json"
    out.write_text('{"previous": "sample"}')
    _failing_dump(monkeypatch)
    # an OSError (here a full disk) is the system refusing a file: one line, exit status 2
    assert main(["sample", "--coco", str(path), "--shots", "1", "--out", str(out), "--allow-fewer"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert out.read_text() == '{"previous": "sample"}'
    monkeypatch.undo()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sample", "--coco", str(path), "--shots", "1", "--out", str(out), "--allow-fewer"]) == 0
    assert json.loads(out.read_text())["annotations"]


def test_sha256_file_is_the_one_file_digest(tmp_path):
    import hashlib

    from refseg.models import checkpoints

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert checkpoints.sha256_file is sha256_file
    assert sha256_file(Path(str(path))) == sha256_file(str(path))

"""Issue 10, item 1: exit statuses of refseg predict / build-bank (0 ok, 2 usage error, 3 finished with failures)."""

from __future__ import annotations

import contextlib
import io
import json

from refseg.cli import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, main
from refseg.testing import make_synthetic_coco

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]


def _bank(tmp_path, refs=None):
    train_images, train_json = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    bank = tmp_path / "bank.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["build-bank", "--references", str(refs or train_json), "--images", str(train_images),
                     "--out", str(bank), *PROPOSER, *TOY]) == EXIT_OK
    return bank, train_images, train_json


def test_predict_exits_3_when_every_image_failed(tmp_path, capsys):
    bank, _, _ = _bank(tmp_path)
    val_images, val_json = make_synthetic_coco(tmp_path / "val", n_images=3, seed=2)
    for p in val_images.glob("*.png"):
        p.unlink()  # every target image is missing
    capsys.readouterr()
    rc = main(["predict", "--bank", str(bank), "--coco", str(val_json), "--images", str(val_images),
               "--out", str(tmp_path / "results.json"), "--quiet", *PROPOSER, *TOY])
    assert rc == EXIT_INCOMPLETE == 3
    captured = capsys.readouterr()
    last = (captured.out + captured.err).strip().splitlines()[-1]
    assert "3 of 3 image(s) failed" in last and "exit status 3" in last


def test_predict_exits_0_when_nothing_failed_and_2_on_usage_error(tmp_path, capsys):
    bank, _, _ = _bank(tmp_path)
    val_images, val_json = make_synthetic_coco(tmp_path / "val", n_images=2, seed=2)
    assert main(["predict", "--bank", str(bank), "--coco", str(val_json), "--images", str(val_images),
                 "--out", str(tmp_path / "results.json"), "--quiet", *PROPOSER, *TOY]) == EXIT_OK
    assert main(["predict", "--bank", str(tmp_path / "missing.safetensors"), "--images", str(val_images),
                 "--out", str(tmp_path / "r2.json"), *PROPOSER, *TOY]) == EXIT_USAGE


def test_build_bank_exits_3_when_a_class_has_no_usable_reference(tmp_path, capsys):
    train_images, train_json = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    coco = json.loads(train_json.read_text())
    classes = sorted({a["category_id"] for a in coco["annotations"]})
    assert len(classes) >= 2
    lost = classes[0]
    lost_images = {a["image_id"] for a in coco["annotations"] if a["category_id"] == lost}
    # the lost class's annotations all point at an image that does not exist
    coco["images"].append({"id": 999, "file_name": "gone.png", "width": 64, "height": 64})
    for a in coco["annotations"]:
        if a["category_id"] == lost:
            a["image_id"] = 999
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(coco))
    assert lost_images
    capsys.readouterr()
    rc = main(["build-bank", "--references", str(refs), "--images", str(train_images),
               "--out", str(tmp_path / "bank.safetensors"), *PROPOSER, *TOY])
    assert rc == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "incomplete bank" in err and "exit status 3" in err
    assert (tmp_path / "bank.safetensors").exists()  # the usable classes are still written

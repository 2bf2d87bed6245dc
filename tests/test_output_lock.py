"""Issue 10, item 2: a second refseg predict on the same --out is refused at start (lock file, flock)."""

from __future__ import annotations

import fcntl
import os

from refseg.cli import EXIT_USAGE, main
from refseg.testing import make_synthetic_coco

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]


def _setup(tmp_path):
    train_images, train_json = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    val_images, _ = make_synthetic_coco(tmp_path / "val", n_images=2, seed=2)
    bank = tmp_path / "bank.safetensors"
    assert main(["build-bank", "--references", str(train_json), "--images", str(train_images), "--out", str(bank),
                 *PROPOSER, *TOY]) == 0
    return bank, val_images


def _predict(bank, images, out):
    return main(["predict", "--bank", str(bank), "--images", str(images), "--out", str(out), "--quiet",
                 *PROPOSER, *TOY])


def test_second_run_on_same_out_is_refused(tmp_path, capsys):
    bank, images = _setup(tmp_path)
    out = tmp_path / "results.json"
    lock = tmp_path / "results.json.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)  # another open file description: conflicts like another process
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        capsys.readouterr()
        assert _predict(bank, images, out) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "another refseg run (pid 4242)" in err and str(out) in err
        assert not out.exists()  # refused before any work
    finally:
        os.close(fd)


def test_stale_lock_file_does_not_block(tmp_path, capsys):
    bank, images = _setup(tmp_path)
    out = tmp_path / "results.json"
    (tmp_path / "results.json.lock").write_text("99999\n")  # left by a killed run: no holder
    assert _predict(bank, images, out) == 0
    assert out.exists()

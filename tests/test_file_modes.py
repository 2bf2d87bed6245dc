"""Issue 10, item 3: every output follows the umask (mkstemp's 0600 is not kept)."""

from __future__ import annotations

import os
import stat

import pytest

from refseg.cli import main
from refseg.io.files import default_mode, mkstemp
from refseg.testing import make_synthetic_coco

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(value):
        os.umask(value)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert default_mode() == mode
    fd, name = mkstemp(dir=tmp_path)
    os.close(fd)
    assert stat.S_IMODE(os.stat(name).st_mode) == mode
    train_images, train_json = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    val_images, _ = make_synthetic_coco(tmp_path / "val", n_images=2, seed=2)
    bank = tmp_path / "bank.safetensors"
    assert main(["build-bank", "--references", str(train_json), "--images", str(train_images), "--out", str(bank),
                 *PROPOSER, *TOY]) == 0
    out = tmp_path / "run" / "results.json"
    out.parent.mkdir()
    cache = tmp_path / "cache"
    assert main(["predict", "--bank", str(bank), "--images", str(val_images), "--out", str(out), "--quiet",
                 "--candidate-cache", str(cache), *PROPOSER, *TOY]) == 0
    files = [bank, *out.parent.iterdir(), *(p for p in cache.rglob("*") if p.is_file())]
    assert any(p.name == "results.json" for p in files) and any(p.name == "results.partial.jsonl" for p in files)
    assert len([p for p in files if cache in p.parents]) >= 2  # cache entries and manifest
    bad = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
           if p.is_file() and stat.S_IMODE(p.stat().st_mode) != mode}
    assert not bad, f"files not created {oct(mode)} under umask {oct(mask)}: {bad}"

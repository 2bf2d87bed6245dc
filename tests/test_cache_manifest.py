"""Issue 10, item 4: a corrupt candidate-cache manifest is rebuilt (folder named by the settings hash) or refused in one line."""

from __future__ import annotations

import json

import pytest

from refseg.runtime.candidate_cache import CacheError, CandidateCache, settings_hash
from refseg.cli import main
from refseg.testing import make_synthetic_coco

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]
SETTINGS = {"proposer": "toy", "size": 256}


def test_corrupt_manifest_rebuilt_when_folder_is_the_settings_hash(tmp_path):
    root = tmp_path / settings_hash(SETTINGS)
    CandidateCache(root, SETTINGS)
    (root / "manifest.json").write_text('{"format": "refseg-cand')  # truncated
    cache = CandidateCache(root, SETTINGS)
    assert cache.settings_hash == settings_hash(SETTINGS)
    assert json.loads((root / "manifest.json").read_text())["settings"] == cache.settings


def test_corrupt_manifest_refused_in_one_line_otherwise(tmp_path):
    root = tmp_path / "mycache"
    CandidateCache(root, SETTINGS)
    (root / "manifest.json").write_text("not json")
    with pytest.raises(CacheError, match="delete the folder") as info:
        CandidateCache(root, SETTINGS)
    assert "\n" not in str(info.value)
    with pytest.raises(CacheError, match="delete the folder"):
        CandidateCache(root)


def test_cli_run_with_corrupt_manifest_does_not_abort(tmp_path, capsys):
    train_images, train_json = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    val_images, _ = make_synthetic_coco(tmp_path / "val", n_images=2, seed=2)
    bank = tmp_path / "bank.safetensors"
    assert main(["build-bank", "--references", str(train_json), "--images", str(train_images), "--out", str(bank),
                 *PROPOSER, *TOY]) == 0
    cache = tmp_path / "cache"
    args = ["predict", "--bank", str(bank), "--images", str(val_images), "--quiet", "--candidate-cache", str(cache),
            *PROPOSER, *TOY]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    manifests = list(cache.rglob("manifest.json"))
    assert len(manifests) == 1
    manifests[0].write_bytes(b"\x00garbage")
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    json.loads(manifests[0].read_text())  # rewritten

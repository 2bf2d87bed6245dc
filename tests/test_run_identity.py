"""One identity per run (refseg.method.identity): a changed checkpoint, bank file or setting is refused or
relabels, never mixed with earlier results. Real SAM2.1-T networks with random weights, written
as official-layout checkpoints; the toy colour encoder stands in for DINOv2 to keep it quick."""

from __future__ import annotations

import json

import pytest
import torch

from refseg import MemoryBank
from refseg.cli import main
from refseg.method.identity import describe_difference, identity_key
from refseg.models import load_sam2
from refseg.models.fingerprint import weights_fingerprint
from refseg.testing import make_train_val

SMALL = ["--set", "proposal.image_size=256", "--set", "proposal.points_per_side=4", "--device", "cpu",
         "--encoder", "refseg.testing:ColorEncoder"]


def _sam2_checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = load_sam2("sam2.1_hiera_t", device="cpu", image_size=256, random_init=True)
    torch.save({"model": model.state_dict()}, path)  # the official layout: {"model": state_dict}
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    train_images, train_json, val_images, val_json = make_train_val(root, 6, 4)
    refs = root / "refs.json"
    assert main(["sample", "--coco", str(train_json), "--shots", "2", "--out", str(refs)]) == 0
    banks = {}
    for shots in (1, 2):
        refs_n = root / f"refs{shots}.json"
        assert main(["sample", "--coco", str(train_json), "--shots", str(shots), "--out", str(refs_n)]) == 0
        banks[shots] = root / f"bank{shots}.safetensors"
        assert main(["build-bank", "--references", str(refs_n), "--images", str(train_images), "--out",
                     str(banks[shots]), "--encoder", "refseg.testing:ColorEncoder", "--device", "cpu"]) == 0
    return {"root": root, "val_images": val_images, "val_json": val_json, "banks": banks,
            "ckpt_a": _sam2_checkpoint(root / "a.pt", 1), "ckpt_b": _sam2_checkpoint(root / "b.pt", 2)}


def predict(setup, bank, ckpt, out, *extra):
    return main(["predict", "--bank", str(bank), "--coco", str(setup["val_json"]), "--images",
                 str(setup["val_images"]), "--out", str(out), "--quiet", "--proposer", "sam2.1_hiera_t",
                 "--proposer-checkpoint", str(ckpt), *SMALL, *extra])


def test_weights_fingerprint_is_content():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[2, 3] += 1e-6  # one element anywhere
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a.to(torch.float64)) != weights_fingerprint(b)


def test_resume_with_another_checkpoint_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert predict(setup, setup["banks"][2], setup["ckpt_a"], out, "--limit", "2") == 0
    partial = tmp_path / "results.partial.jsonl"
    done = partial.read_text().splitlines()
    assert len(done) == 1 + 2
    capsys.readouterr()
    # the same architecture and name, other weights: never "2 done earlier, 2 labelled now"
    assert predict(setup, setup["banks"][2], setup["ckpt_b"], out) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "proposer" in err
    assert partial.read_text().splitlines() == done  # nothing was added to the other run's progress
    # a copy of the same weights under another name is the same run: it resumes
    copy = tmp_path / "renamed.pt"
    copy.write_bytes(setup["ckpt_a"].read_bytes())
    assert predict(setup, setup["banks"][2], copy, out) == 0
    assert len(partial.read_text().splitlines()) == 1 + 4


def test_resume_with_a_changed_bank_file_is_refused(setup, tmp_path, capsys):
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(setup["banks"][2].read_bytes())
    out = tmp_path / "results.json"
    assert predict(setup, bank, setup["ckpt_a"], out, "--limit", "1") == 0
    bank.write_bytes(setup["banks"][1].read_bytes())  # same path, other content
    capsys.readouterr()
    assert predict(setup, bank, setup["ckpt_a"], out) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "bank" in err


def test_identity_helpers():
    a = {"config": 1, "proposer": {"weights": "x"}, "bank": "b"}
    b = {"config": 1, "proposer": {"weights": "y"}, "bank": "c"}
    assert describe_difference(a, b) == "bank, proposer"
    assert identity_key(a) == identity_key(json.loads(json.dumps(a))) != identity_key(b)


def test_bank_records_the_encoder_and_refuses_another(setup):
    bank = MemoryBank.load(setup["banks"][2])
    with pytest.raises(Exception, match="different features"):
        bank.check_encoder({**bank.encoder_settings, "weights": "other"})

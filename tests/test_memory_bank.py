"""Memory bank: editing, prototypes, storage format, refusal of foreign banks."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from refseg import BankError, BankMismatchError, MemoryBank, Segmenter
from refseg.testing import ColorEncoder, ColorRegionProposer

SETTINGS = {"name": "dinov2_vitl14", "input_size": 518, "patch_size": 14, "dim": 4}


def _bank():
    bank = MemoryBank(SETTINGS)
    bank.add("cat", torch.tensor([1.0, 0, 0, 0]), source={"image": "a.jpg", "annotation_id": 1}, id="r1")
    bank.add("cat", torch.tensor([3.0, 4.0, 0, 0]), source={"image": "b.jpg", "annotation_id": 2}, id="r2")
    bank.add("dog", torch.tensor([0, 0, 2.0, 0]), id="r3")
    bank.add("dog", torch.tensor([0, 0, 0, 1.0]), negative=True, id="n1")
    return bank


def test_prototypes_are_normalised_unweighted_means_of_raw_embeddings():
    protos = _bank().prototypes()
    torch.testing.assert_close(protos[0], F.normalize(torch.tensor([2.0, 2.0, 0, 0]), dim=0))
    torch.testing.assert_close(protos[1], torch.tensor([0, 0, 1.0, 0]))  # the negative does not count


def test_add_remove_without_reencoding_and_counts():
    bank = _bank()
    assert bank.counts() == {"cat": 2, "dog": 1} and bank.counts(negative=True) == {"cat": 0, "dog": 1}
    assert bank.remove("r1") == 1
    torch.testing.assert_close(bank.prototypes()[0], F.normalize(torch.tensor([3.0, 4.0, 0, 0]), dim=0))
    bank.remove_class("dog")
    assert bank.class_names == ["cat"] and len(bank) == 1
    with pytest.raises(BankError, match="not in the bank"):
        bank.remove_class("dog")
    with pytest.raises(BankError, match="already in the bank"):
        bank.add("cat", torch.ones(4), id="r2")
    with pytest.raises(BankError, match="dimension"):
        bank.add("cat", torch.ones(5))
    with pytest.raises(BankError, match="not finite"):
        bank.add("cat", torch.tensor([float("nan"), 0, 0, 0]))
    assert [e.id for e in _bank().find(image="b.jpg")] == ["r2"]


def test_class_without_positive_reference_gets_a_zero_prototype():
    bank = MemoryBank(SETTINGS)
    bank.add("cat", torch.ones(4))
    bank.add("ghost", torch.ones(4), negative=True)
    assert bank.prototypes()[1].abs().sum() == 0
    bank.remove_class("cat")
    with pytest.raises(BankError, match="no positive reference"):
        bank.check_usable()


def test_save_load_roundtrip_is_safetensors_with_json_header(tmp_path):
    bank = _bank()
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(path, SETTINGS)
    assert loaded.class_names == bank.class_names
    assert [e.to_dict() for e in loaded.entries] == [e.to_dict() for e in bank.entries]
    torch.testing.assert_close(loaded.prototypes(), bank.prototypes())
    # the header is plain JSON in the safetensors file (no pickle anywhere)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["refseg"])
    assert header["format_version"] == 1 and header["encoder"] == SETTINGS
    assert header["references"][0]["source"] == {"image": "a.jpg", "annotation_id": 1}


def test_bank_of_80_classes_by_30_shots_is_a_few_megabytes(tmp_path):
    bank = MemoryBank({**SETTINGS, "dim": 1024})
    for c in range(80):
        for s in range(30):
            bank.add(f"class{c}", torch.randn(1024), source={"image": f"img{c}_{s}.jpg", "annotation_id": s})
    size = bank.save(tmp_path / "big.safetensors").stat().st_size
    assert 9.8e6 < size < 12e6  # 2400 x 1024 float32 = 9.8 MB plus the header


def test_mismatched_encoder_is_refused_with_a_clear_message(tmp_path):
    path = _bank().save(tmp_path / "bank.safetensors")
    with pytest.raises(BankMismatchError, match=r"name: bank='dinov2_vitl14' encoder='dinov2_vits14'"):
        MemoryBank.load(path, {**SETTINGS, "name": "dinov2_vits14"})
    enc = ColorEncoder()
    with pytest.raises(BankMismatchError, match="rebuild the bank"):
        Segmenter(ColorRegionProposer(), enc, MemoryBank.load(path))


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="memory bank not found"):
        MemoryBank.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(BankError, match="cannot read memory bank"):
        MemoryBank.load(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"embeddings": torch.zeros(1, 4)}, str(foreign))
    with pytest.raises(BankError, match="not a refseg memory bank"):
        MemoryBank.load(foreign)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(_bank().save(tmp_path / "ok.safetensors").read_bytes()[:-10])
    with pytest.raises(BankError):
        MemoryBank.load(truncated)

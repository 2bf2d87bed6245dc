"""Issue 10, item 5: messages for a checkpoint holding Python objects, and --limit 0."""

from __future__ import annotations

import pytest
import torch

from refseg.cli import EXIT_USAGE, main
from refseg.models.checkpoints import CheckpointError, load_torch_file


class Payload:  # a custom class: weights_only loading refuses it
    def __init__(self):
        self.weights = torch.zeros(2)


def test_checkpoint_with_python_objects_is_refused_for_safety(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_torch_file(path, "encoder")
    message = str(info.value)
    assert "holds Python objects" in message and "refused for safety" in message
    assert "weights_only=False" not in message and "truncated, corrupt" not in message


def test_truncated_checkpoint_still_reported_as_corrupt(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_torch_file(path, "encoder")


def test_limit_zero_is_a_usage_error(tmp_path, capsys):
    from refseg.testing import make_synthetic_coco

    images, _ = make_synthetic_coco(tmp_path / "val", n_images=1, seed=2)
    (tmp_path / "bank.safetensors").write_bytes(b"")
    rc = main(["predict", "--bank", str(tmp_path / "bank.safetensors"), "--images", str(images),
               "--out", str(tmp_path / "r.json"), "--limit", "0"])
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--limit must be at least 1" in err and "no image file" not in err

"""Issue 10, item 1: exit statuses of refseg predict / build-bank (0 ok, 2 usage error, 3 finished with failures)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from refseg import PAPER
from refseg.cli import EXIT_CRASH, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, main
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


def _render_args(tmp_path):
    """A real ``refseg render`` of ground-truth masks given as results (no network runs)."""
    images, gt = make_synthetic_coco(tmp_path / "gt", n_images=2, seed=3)
    records = [{**a, "score": 0.9} for a in json.loads(gt.read_text())["annotations"]]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(records))
    return ["render", "--images", str(images), "--results", str(results), "--gt", str(gt),
            "--out", str(tmp_path / "renders")]


_CRASHING_RUN = """
import sys
import numpy
import refseg.cli

def broken(*args, **kwargs):
    raise ValueError("boom deep in numpy")

numpy.rint = broken  # called where the picture is made: a bug there is not the user's input
sys.exit(refseg.cli.main(sys.argv[1:]))
"""


def test_a_value_error_from_deep_inside_is_a_crash_with_its_traceback(tmp_path, monkeypatch, capsys):
    import os
    import subprocess
    import sys

    import numpy

    args = _render_args(tmp_path)
    assert main(args) == EXIT_OK  # the command works unpatched
    run = subprocess.run([sys.executable, "-c", _CRASHING_RUN, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert run.returncode == EXIT_CRASH == 1, run.stderr
    assert "Traceback (most recent call last)" in run.stderr and "ValueError: boom deep in numpy" in run.stderr
    assert "refseg render: error" not in run.stderr
    for error in (ValueError, KeyError, TypeError):  # main lets them through (the traceback above, exit 1)
        monkeypatch.setattr(numpy, "rint", _raiser(error("no such thing")))
        with pytest.raises(error, match="no such thing"):
            main(args)


def _raiser(exc):
    def raise_it(*args, **kwargs):
        raise exc
    return raise_it


def test_a_refseg_error_is_a_user_error_in_one_line(tmp_path, monkeypatch, capsys):
    import numpy

    from refseg.errors import InvalidInput, UnknownName

    args = _render_args(tmp_path)
    for exc in (InvalidInput("the input is unusable"), UnknownName("unknown thing 'x'"),
                PermissionError("cannot write here"), IsADirectoryError("a folder, not a file")):
        monkeypatch.setattr(numpy, "rint", _raiser(exc))
        capsys.readouterr()
        assert main(args) == EXIT_USAGE == 2
        assert capsys.readouterr().err == f"refseg render: error: {exc.args[0]}\n"


def test_library_errors_are_refseg_errors_and_keep_their_builtin_bases():
    from refseg import BankError, ImageLoadError, RefsegError, UnusableReference  # noqa: F401
    from refseg.io.coco import CocoError, SamplingError
    from refseg.method.config import get_preset
    from refseg.models.checkpoints import CheckpointError
    from refseg.models.registry import ComponentError, build_proposer
    from refseg.runtime.predict_job import OutputLocked, PartialRunMismatch

    for cls, base in ((BankError, ValueError), (ImageLoadError, RuntimeError), (CocoError, ValueError),
                      (SamplingError, ValueError), (CheckpointError, RuntimeError), (ComponentError, TypeError),
                      (OutputLocked, ValueError), (PartialRunMismatch, ValueError)):
        assert issubclass(cls, RefsegError) and issubclass(cls, base), cls
    with pytest.raises(KeyError, match="unknown preset 'nope'") as info:
        get_preset("nope")
    assert isinstance(info.value, RefsegError) and str(info.value).startswith("unknown preset 'nope'")
    with pytest.raises(ValueError, match="unknown proposer") as info:
        build_proposer("nope")
    assert isinstance(info.value, RefsegError)
    with pytest.raises(ValueError, match="setting merge.top_k") as info:
        PAPER.with_overrides(**{"merge.top_k": -3})
    assert isinstance(info.value, RefsegError)

"""Issue 10 and issue 9 §2: interrupted runs keep what they finished and resume exactly; run_prediction locks its
output; the method layer imports no runtime module; one labelling loop for every labeller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from refseg import PAPER, Segmenter
from refseg.cli import main
from refseg.runtime.labelling import LabelStats, batched, label_stream
from refseg.runtime.predict_job import OutputLocked, lock_output, run_prediction, sidecar_path
from refseg.testing import ColorEncoder, ColorRegionProposer, make_train_val

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256",
       "--proposer", "refseg.testing:ColorRegionProposer"]
CFG = PAPER.with_overrides(**{"proposal.image_size": 256})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    train_images, train_json, val_images, _ = make_train_val(root, 3, 6)
    bank = root / "bank.safetensors"
    assert main(["build-bank", "--references", str(train_json), "--images", str(train_images), "--out", str(bank),
                 *TOY]) == 0
    return bank, val_images


def _predict(bank, images, out, *extra):
    return main(["predict", "--bank", str(bank), "--images", str(images), "--out", str(out), "--quiet",
                 "--batch-size", "2", *TOY, *extra])


def _recorded(out) -> list[int]:
    lines = sidecar_path(out, ".partial.jsonl").read_text().splitlines()[1:]
    return [json.loads(line)["image_id"] for line in lines]


def _count_batches(monkeypatch, on_call=None):
    """Count Segmenter.label_prepared calls (and the images they get); ``on_call(n)`` runs before call n."""
    real = Segmenter.label_prepared
    seen = {"calls": 0, "images": 0}

    def counting(self, items, cache=None):
        seen["calls"] += 1
        if on_call is not None:
            on_call(seen["calls"])
        seen["images"] += len(items)
        return real(self, items, cache)

    monkeypatch.setattr(Segmenter, "label_prepared", counting)
    return seen


def test_cli_keyboard_interrupt_keeps_finished_batches_and_resumes(toy, tmp_path, monkeypatch, capsys):
    bank, images = toy
    out = tmp_path / "results.json"

    def stop_second(n):
        if n == 2:
            raise KeyboardInterrupt

    _count_batches(monkeypatch, stop_second)
    assert _predict(bank, images, out) == 130
    err = capsys.readouterr().err
    assert "2 image(s) labelled by this run are kept" in err and "run the same command again" in err
    assert _recorded(out) == [1, 2] and not out.exists()

    seen = _count_batches(monkeypatch)
    assert _predict(bank, images, out) == 0
    assert seen["images"] == 4  # the two finished images are not labelled again
    assert _recorded(out) == [1, 2, 3, 4, 5, 6]
    assert "2 done earlier, 4 labelled now" in capsys.readouterr().out


def test_ctrl_c_finishes_the_batch_in_flight_then_stops(toy, tmp_path, monkeypatch, capsys):
    bank, images = toy
    out = tmp_path / "results.json"

    def sigint_during_first(n):
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C while the networks work on the first batch

    seen = _count_batches(monkeypatch, sigint_during_first)
    assert _predict(bank, images, out) == 130
    assert seen["calls"] == 1
    assert _recorded(out) == [1, 2]  # the batch in flight was finished and recorded
    err = capsys.readouterr().err
    assert "finishing the current batch" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert _predict(bank, images, out) == 0
    assert _recorded(out) == [1, 2, 3, 4, 5, 6]


def test_run_prediction_refuses_a_second_call_on_the_same_output(toy, tmp_path, monkeypatch):
    bank_path, images = toy
    from refseg import MemoryBank

    seg = Segmenter(ColorRegionProposer(), ColorEncoder(input_size=518), MemoryBank.load(bank_path), CFG)
    targets = [(i + 1, p) for i, p in enumerate(sorted(images.glob("*.png")) or sorted(images.iterdir()))]
    out = tmp_path / "results.json"
    inside, release = threading.Event(), threading.Event()

    def hold(n):
        inside.set()
        assert release.wait(60)

    _count_batches(monkeypatch, hold)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.setdefault("run", run_prediction(seg, targets, out,
                                                                                   progress=False)))
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(OutputLocked, match="another refseg run"):
            run_prediction(seg, targets, out, progress=False)
        with pytest.raises(OutputLocked):  # the CLI's lock is the same lock
            with lock_output(out):
                pass
    finally:
        release.set()
        thread.join(120)
    assert first["run"].n_processed == len(targets)
    # within one thread the CLI's lock around run_prediction is not taken twice
    with lock_output(out):
        assert run_prediction(seg, targets, out, progress=False).n_resumed == len(targets)


def test_label_stream_counts_failures_and_reports_after_every_batch(toy, tmp_path):
    bank_path, images = toy
    from refseg import MemoryBank

    seg = Segmenter(ColorRegionProposer(), ColorEncoder(input_size=518), MemoryBank.load(bank_path), CFG)
    paths = sorted(p for p in images.iterdir() if p.is_file())[:3] + [tmp_path / "missing.png"]
    written = []

    class ListSink:
        def open(self, batch):
            return [(p, p) for p in batch]

        def name(self, p):
            return str(p)

        def write(self, batch, labelled, failed):
            written.append(([p for p, _ in labelled], [p for p, _ in failed]))

    steps = [(s.done, s.labelled, s.failed) for s in label_stream(seg, batched(paths, 2), ListSink())]
    assert steps == [(2, 2, 0), (4, 3, 1)]
    assert written == [(paths[:2], []), ([paths[2]], [paths[3]])]
    with pytest.raises(ValueError, match="at least 1"):
        batched(paths, 0)
    stats = LabelStats(total=4)
    loop = label_stream(seg, batched(paths, 2), ListSink(), stats=stats)
    next(loop)
    loop.close()  # the caller stops between batches
    assert stats.interrupted and stats.done == 2


def test_method_layer_imports_no_runtime_module():
    code = ("import sys, refseg.method.pipeline, refseg.method.references; "
            "print(sorted(m for m in sys.modules if m.startswith('refseg.runtime') or m == 'fiftyone'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.strip()
    assert out == "[]"

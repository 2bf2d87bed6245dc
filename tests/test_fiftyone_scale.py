"""The FiftyOne plugin at scale: shards of one labelling run for several delegated workers, and several
local devices in one run (``auto_label(num_shards=..., shard_index=..., devices=...)``).

Same isolation as ``test_fiftyone_plugin.py`` (``tests/conftest.py``: a private database and plugins
folder); the toy components of :mod:`refseg.testing`; two real ``fiftyone delegated launch`` workers.
"""

from __future__ import annotations

import asyncio

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bson import ObjectId

fo = pytest.importorskip("fiftyone")
import refseg_fiftyone.convert  # noqa: E402
import refseg_fiftyone.core  # noqa: E402
from fiftyone.operators.delegated import DelegatedOperationService  # noqa: E402
from fiftyone.operators.executor import ExecutionContext, ExecutionError, Executor  # noqa: E402

from test_fiftyone_plugin import REAL_SMALL, build_toy_bank, make_dataset, op, run_queued  # noqa: E402
from conftest import clear_queued_operations  # noqa: E402


def labels_of(dataset, field: str) -> dict:
    """sample id -> [(label, confidence, box, mask)] of ``field`` (samples without it left out)."""
    dataset.reload()
    return {s.id: [(d.label, d.confidence, d.bounding_box, d.mask) for d in s[field].detections]
            for s in dataset.exists(field).select_fields(field)}


def assert_same_labels(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(expected)
    for sample_id, dets in expected.items():
        mine = got[sample_id]
        assert len(mine) == len(dets), sample_id
        for (la, ca, ba, ma), (lb, cb, bb, mb) in zip(mine, dets):
            assert la == lb
            assert ca == pytest.approx(cb, abs=atol)
            np.testing.assert_allclose(ba, bb, atol=atol)
            assert np.array_equal(ma, mb)


def target_ids(dataset, tag: str = "reference") -> list[str]:
    return dataset.match_tags(tag, bool=False).values("id")


@pytest.fixture()
def dataset(tmp_path):
    ds = make_dataset(tmp_path / "images", n_images=14, n_references=2)
    yield ds
    ds.delete()


# ---------------------------------------------------------------------------- shards, in process


def test_shard_partition_is_stable_disjoint_complete_and_balanced():
    core = refseg_fiftyone.core
    ids = [f"{i:024x}" for i in range(3000)]
    for n in (1, 2, 3, 7):
        shards = [[i for i in ids if core.shard_of(i, n) == k] for k in range(n)]
        assert sum(len(s) for s in shards) == len(ids) and set().union(*shards) == set(ids)
        assert all(abs(len(s) - len(ids) / n) < 0.1 * len(ids) / n for s in shards)
    # depends on the id alone: what a worker on another machine computes
    assert [core.shard_of(i, 4) for i in ids[:50]] == [core.shard_of(str(i), 4) for i in ids[:50]]
    assert core.check_shard(None, None) == (1, 0)
    for bad in ((0, 0), (2, 2), (3, -1)):
        with pytest.raises(ValueError, match="num_shards|shard_index"):
            core.check_shard(*bad)


def test_each_shard_labels_exactly_its_samples_and_resumes(dataset, monkeypatch):
    build_toy_bank(dataset)
    auto = op("auto_label")
    single = auto(dataset, label_field="single", delegate=False)
    expected = labels_of(dataset, "single")
    targets = target_ids(dataset)
    assert single["num_labelled"] == len(targets) == 12 and single["shard"] is None

    core = refseg_fiftyone.core
    real_write = core._write_labels
    written: list[str] = []

    def recording_write(sample, field, labels):
        written.append(sample.id)
        real_write(sample, field, labels)

    monkeypatch.setattr(core, "_write_labels", recording_write)
    n = 3
    seen: set[str] = set()
    for index in range(n):
        written.clear()
        report = auto(dataset, label_field="sharded", num_shards=n, shard_index=index, delegate=False)
        mine = {i for i in targets if core.shard_of(i, n) == index}
        assert set(written) == mine and len(written) == len(mine)  # its shard, each sample once
        assert report["shard"] == {"index": index, "count": n}
        assert report["num_targets"] == report["num_labelled"] == len(mine) and report["run_key"] == single["run_key"]
        assert not seen & mine
        seen |= mine
    assert seen == set(targets)
    assert_same_labels(labels_of(dataset, "sharded"), expected, atol=0)

    # resume: a shard run again, and the whole run without shards, find everything done
    written.clear()
    again = auto(dataset, label_field="sharded", num_shards=n, shard_index=1, delegate=False)
    assert again["num_labelled"] == 0 and again["num_already_done"] == again["num_targets"] and written == []
    whole = auto(dataset, label_field="sharded", delegate=False)
    assert whole["num_labelled"] == 0 and whole["num_already_done"] == len(targets)

    with pytest.raises(ExecutionError, match="shard_index"):
        auto(dataset, label_field="sharded", num_shards=3, shard_index=3, delegate=False)


def test_queue_all_shards_queues_one_delegated_job_per_shard(dataset):
    build_toy_bank(dataset)
    # the App's form: several shards and none chosen -> queue them all (at once, not as a job itself)
    auto = op("auto_label")
    ctx = ExecutionContext(request_params=dict(dataset_name=dataset.name, params=dict(num_shards=3)),
                           executor=Executor())
    assert auto.resolve_delegation(ctx) is False
    form = auto.resolve_input(ctx).type.properties
    assert "shard_index" in form and "shards_notice" in form and "delegate" not in form
    messages = list(asyncio.run(auto.execute(ctx)))  # what the App gets (execute is a coroutine): a notification
    assert [m.body.operator_uri for m in messages] == ["notify"] and "Queued 3" in messages[0].body.params["message"]
    assert len(DelegatedOperationService().get_queued_operations(dataset_name=dataset.name)) == 3
    DelegatedOperationService().delete_for_dataset(dataset._doc.id)
    ctx = ExecutionContext(request_params=dict(dataset_name=dataset.name, params=dict(num_shards=3, shard_index=1)),
                           executor=Executor())
    # one shard is an ordinary run: immediate or delegated by its expected time (the toy models: immediate),
    # with the usual Delegate choice in the form
    assert auto.resolve_delegation(ctx) is False
    assert "delegate" in auto.resolve_input(ctx).type.properties

    view = dataset.skip(1)  # a view: each shard job works on it
    queued = op("auto_label")(view, label_field="queued", num_shards=3, existing="overwrite")
    assert queued["num_shards"] == 3 and len(queued["jobs"]) == 3
    assert dataset.has_sample_field("queued")  # declared once, before the jobs run
    service = DelegatedOperationService()
    docs = [service.get(ObjectId(j)) for j in queued["jobs"]]
    assert [d.run_state for d in docs] == ["queued"] * 3
    assert [d.context.params["shard_index"] for d in docs] == [0, 1, 2]
    assert all(d.context.params["num_shards"] == 3 for d in docs)
    assert docs[1].label == "refseg: auto-label queued (shard 2/3)"
    results = run_queued(dataset)
    assert sorted(r.result["shard"]["index"] for r in results) == [0, 1, 2]
    assert all(r.result["num_targets"] == r.result["num_labelled"] for r in results)
    dataset.reload()
    assert sum(r.result["num_labelled"] for r in results) == len(target_ids(view)) == len(view.exists("queued"))
    assert len(dataset.exists("queued")) == len(view.exists("queued"))  # the sample skipped by the view is not


# ---------------------------------------------------------------------------- two real workers


class Worker:
    """A ``fiftyone delegated launch`` subprocess (same environment: same database and plugins folder).

    Its output goes to a file (read back from a pipe by a thread, some lines went missing).
    """

    def __init__(self, name: str, log_dir: Path):
        cli = Path(sys.executable).with_name("fiftyone")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.name = name
        self.log = log_dir / f"worker_{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([str(cli), "delegated", "launch"], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        return "Delegated operation service running" in self.output

    def ran(self) -> list[str]:
        return re.findall(r"Running operation ([0-9a-f]{24})", self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_two_delegated_launch_workers_label_the_shards_once(dataset, tmp_path):
    clear_queued_operations()
    build_toy_bank(dataset)
    op("auto_label")(dataset, label_field="single", delegate=False)
    expected = labels_of(dataset, "single")
    targets = target_ids(dataset)
    core = refseg_fiftyone.core
    service = DelegatedOperationService()

    workers = []
    try:
        workers = [Worker("A", tmp_path), Worker("B", tmp_path)]
        deadline = time.time() + 60
        while not all(w.ready() for w in workers):
            dead = [w for w in workers if w.proc.poll() is not None]
            assert not dead and time.time() < deadline, "\n".join(f"{w.name}: {w.output[-2000:]}" for w in workers)
            time.sleep(0.2)
        # both workers poll the queue: queue one job per shard
        queued = op("auto_label")(dataset, label_field="refseg", num_shards=2)
        jobs = queued["jobs"]
        deadline = time.time() + 180
        while time.time() < deadline:
            docs = [service.get(ObjectId(j)) for j in jobs]
            if all(d.run_state in ("completed", "failed") for d in docs):
                break
            time.sleep(0.5)
    finally:
        for w in workers:
            w.stop()
    logs = "\n".join(f"--- worker {w.name}\n{w.output[-3000:]}" for w in workers)
    assert [d.run_state for d in docs] == ["completed", "completed"], f"{[d.result for d in docs]}\n{logs}"

    # the two workers shared the work: each ran one job, no job ran twice
    assert sorted(workers[0].ran() + workers[1].ran()) == sorted(jobs), logs
    assert len(workers[0].ran()) == len(workers[1].ran()) == 1, logs

    # each job labelled its shard, all of it; together every target exactly once
    reports = [d.result.result for d in docs]
    for index, report in enumerate(reports):
        shard = [i for i in targets if core.shard_of(i, 2) == index]
        assert report["shard"] == {"index": index, "count": 2}
        assert report["num_targets"] == report["num_labelled"] == len(shard) and report["num_failed"] == 0
    assert sum(r["num_labelled"] for r in reports) == len(targets)  # no sample written twice ...
    got = labels_of(dataset, "refseg")
    assert sorted(got) == sorted(targets)  # ... and none missing, no reference labelled
    assert_same_labels(got, expected, atol=0)  # what one process gives
    dataset.reload()
    assert {s.refseg.refseg_run for s in dataset.exists("refseg")} == {reports[0]["run_key"]}
    assert dataset.info["refseg_runs"]["refseg"]["shard"]["count"] == 2

    # a rerun of both shards (in process this time) finds nothing to do
    op("auto_label")(dataset, label_field="refseg", num_shards=2)
    again = run_queued(dataset)
    assert [r.result["num_labelled"] for r in again] == [0, 0]


# ---------------------------------------------------------------------------- several devices


def test_auto_label_on_two_devices_gives_the_single_device_labels(dataset):
    build_toy_bank(dataset)
    auto = op("auto_label")
    single = auto(dataset, label_field="single", delegate=False, devices="cpu")  # one device: in process
    assert single["devices"] == ["cpu"]
    expected = labels_of(dataset, "single")

    pooled = auto(dataset, label_field="pooled", devices="cpu,cpu", batch_size=2, delegate=True)
    (result,) = run_queued(dataset)  # delegated, as a worker runs it
    report = result.result
    assert report["devices"] == ["cpu", "cpu"] and report["num_labelled"] == 12 and report["num_failed"] == 0
    assert report["run_key"] == single["run_key"] and pooled["operator"].endswith("auto_label")
    assert_same_labels(labels_of(dataset, "pooled"), expected)

    # shards and devices together: a worker per machine using its devices
    shard = auto(dataset, label_field="both", devices="cpu,cpu", num_shards=2, shard_index=0, delegate=False)
    assert shard["devices"] == ["cpu", "cpu"] and shard["num_labelled"] == shard["num_targets"]
    got = labels_of(dataset, "both")
    assert_same_labels(got, {i: expected[i] for i in got})

    # the device workers share the candidate cache: a second run reads every sample's proposals from it
    first = auto(dataset, label_field="cached", devices="cpu,cpu", cache_candidates=True, delegate=False)
    assert first["cache"]["writes"] == 12 and first["cache"]["hits"] == 0
    again = auto(dataset, label_field="cached", devices="cpu,cpu", cache_candidates=True, existing="overwrite",
                 delegate=False)
    assert again["cache"]["hits"] == 12 and again["cache"]["writes"] == 0 and again["num_labelled"] == 12
    assert again["cache"]["path"] == first["cache"]["path"]
    assert_same_labels(labels_of(dataset, "cached"), expected)
    with pytest.raises(ExecutionError, match="CUDA|cuda"):
        auto(dataset, label_field="pooled", devices="cuda:7,cuda:8", delegate=False)


@pytest.mark.slow
def test_two_devices_build_the_random_weight_networks_of_the_bank(tmp_path):
    """With random weights (no checkpoint) each device worker must build the networks the bank was built with."""
    dataset = make_dataset(tmp_path / "images", n_images=4, n_references=2, height=128, width=160)
    try:
        models = REAL_SMALL
        op("build_memory_bank")(dataset, label_field="ground_truth", bank_name="real", **models)
        single = op("auto_label")(dataset, bank_name="real", label_field="single", device="cpu", delegate=False)
        pooled = op("auto_label")(dataset, bank_name="real", label_field="pooled", devices="cpu,cpu",
                                  delegate=False)
        assert pooled["num_labelled"] == single["num_labelled"] == 2
        assert single["num_instances"] > 0, "random networks still propose something: nothing was compared"
        assert_same_labels(labels_of(dataset, "pooled"), labels_of(dataset, "single"), atol=1e-4)
    finally:
        dataset.delete()

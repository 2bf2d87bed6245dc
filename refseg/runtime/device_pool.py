"""Every local device at once: one worker process per device, results in input order.

:class:`DevicePool` is a :class:`~refseg.runtime.labelling.Labeller`, as a
:class:`~refseg.method.pipeline.Segmenter` is, so the labelling loop
(:func:`refseg.runtime.labelling.label_stream`, under ``refseg predict`` and the FiftyOne
auto-label) drives several GPUs exactly as it drives one: each batch is split into contiguous parts, one per device, labelled in
parallel and put back in order, so no image is lost, duplicated or reordered.

With ``candidate_dir`` the workers share one :class:`~refseg.runtime.candidate_cache.CandidateCache`
(``pool.cache``, a sub-folder per stage-1 settings, as ``refseg predict --candidate-cache``):
an image with an entry is neither decoded nor sent; the worker that labels it reads the entry.

For many machines use FiftyOne's delegated-operation queue instead (see the README).
"""

from __future__ import annotations

import os
import queue
import traceback

import numpy as np
import torch
import torch.multiprocessing as mp

from refseg.errors import InvalidInput
from refseg.runtime.candidate_cache import CandidateCache, stage1_settings
from refseg.method.identity import describe_difference
from refseg.method.memory_bank import MemoryBank
from refseg.method.pipeline import PreparedImage, cache_key
from refseg.method.results import Detections
from refseg.runtime.run_spec import RunSpec


def local_devices(spec: str) -> list[str]:
    """``"all"`` -> every CUDA device (or ``["cpu"]``); ``"cuda:0,cuda:1"`` -> that list."""
    if spec == "all":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise InvalidInput(f"no device in {spec!r}")
    return devices


def _pack(dets: Detections) -> dict:
    """Detections -> what goes through the pipe: the masks in their compact form (tight boxes and
    bit-packed crops, :class:`~refseg.method.results.CompactMasks`: a few KB, not H x W bytes each)."""
    return dict(masks=dets.compact, boxes=dets.boxes, scores=dets.scores, labels=dets.labels,
                pred_iou=dets.pred_iou, candidate_index=dets.candidate_index, class_names=dets.class_names)


def _unpack(d: dict) -> Detections:
    """The inverse of :func:`_pack`; the full masks are made only when ``masks`` is read."""
    return Detections(**d)


def _worker(spec: RunSpec, bank_path: str, device: str, threads: int, candidate_dir: str | None, jobs,
            results) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        seg = spec.build_segmenter(MemoryBank.load(bank_path), device)
        cache = CandidateCache.for_segmenter(candidate_dir, seg) if candidate_dir is not None else None
        results.put(("ready", device, {
            "identity": seg.identity(), "stage1": stage1_settings(seg), "encoder": seg.encoder.settings(),
            "cache": None if cache is None else str(cache.root)}))
    except BaseException:
        results.put(("error", device, traceback.format_exc()))
        return
    while True:
        job = jobs.get()
        if job is None:
            return
        job_id, items, use_cache = job
        try:
            used = cache if use_cache else None
            before = dict(cache.stats) if cache is not None else {}
            if used is not None:
                items = [_read_entry(seg, used, item) for item in items]
            dets = seg.label_prepared(items, used)
            stats = {k: v - before[k] for k, v in cache.stats.items()} if cache is not None else {}
            results.put(("done", job_id, ([_pack(d) for d in dets], stats)))
        except BaseException:
            results.put(("error", job_id, traceback.format_exc()))


def _read_entry(seg, cache, item: PreparedImage) -> PreparedImage:
    """In a worker: the cache entry the main process found for ``item`` (or, if it is unreadable now, the image)."""
    if item.candidates is not None or item.rgb is not None:
        return item
    return PreparedImage.read(item.source, item.key, cache.get(item.key, seg.proposer.device))


class WorkerError(RuntimeError):
    """A device worker failed; carries the worker's traceback."""


class DevicePool:
    """Label images on several devices in parallel, one worker process per device.

    ``spec`` (a :class:`~refseg.runtime.run_spec.RunSpec`) and the bank file at ``bank_path``
    are what every worker builds its :class:`~refseg.Segmenter` from, on its own device.

    >>> with DevicePool(RunSpec(), "bank.safetensors", ["cuda:0", "cuda:1"]) as pool:
    ...     run_prediction(pool, targets, "results.json")
    """

    def __init__(self, spec: RunSpec, bank_path: str | os.PathLike, devices: list[str], start_timeout: float = 600.0,
                 candidate_dir: str | os.PathLike | None = None):
        if not devices:
            raise ValueError("DevicePool needs at least one device")
        self.spec = spec
        self.devices = list(devices)
        self.config = spec.config()
        self.bank_path = os.fspath(bank_path)
        self.bank = MemoryBank.load(self.bank_path)
        self.class_names = list(self.bank.class_names)
        ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        self._results = ctx.Queue()
        self._jobs = []
        self._procs = []
        cpu_workers = sum(1 for d in devices if d.startswith("cpu"))
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0
        for device in self.devices:
            jobs = ctx.Queue()
            worker_threads = threads if device.startswith("cpu") else 0
            proc = ctx.Process(target=_worker, args=(spec, self.bank_path, device, worker_threads,
                                                     None if candidate_dir is None else str(candidate_dir),
                                                     jobs, self._results), daemon=True)
            proc.start()
            self._jobs.append(jobs)
            self._procs.append(proc)
        infos = []
        try:
            for _ in self.devices:
                kind, who, payload = self._get(start_timeout)
                if kind == "error":
                    raise WorkerError(f"worker on {who} failed to start:\n{payload}")
                infos.append(payload)
        except BaseException:
            self.close()
            raise
        self.bank.check_encoder(infos[0]["encoder"])
        identities = [info["identity"] for info in infos]
        if any(other != identities[0] for other in identities[1:]):
            self.close()
            raise WorkerError("the device workers built different models (differs in: "
                              f"{describe_difference(identities[0], next(o for o in identities if o != identities[0]))}): "
                              "their results would be mixed")
        self._identity = identities[0]
        self._stage1 = infos[0]["stage1"]
        self._next_job = 0
        self.cache = None  # the candidate cache the workers share, with candidate_dir
        if candidate_dir is not None:
            self.cache = CandidateCache.for_segmenter(candidate_dir, self)
            roots = {info["cache"] for info in infos} | {str(self.cache.root)}
            if len(roots) != 1:
                self.close()
                raise WorkerError(f"the device workers disagree on their stage-1 settings ({sorted(roots)}): "
                                  "they would fill different candidate caches; check that every device runs the "
                                  "same refseg and model versions")

    def identity(self) -> dict:
        """What determines the pool's results: its workers' :meth:`Segmenter.identity` (all the same)."""
        return dict(self._identity)

    def stage1_settings(self) -> dict:
        """What determines the workers' stage-1 outputs (:meth:`Segmenter.stage1_settings`, the same in all)."""
        return self._stage1

    def _get(self, timeout: float):
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            dead = [d for d, p in zip(self.devices, self._procs) if not p.is_alive()]
            raise WorkerError(f"no answer from the device workers in {timeout:.0f} s"
                              + (f"; dead: {', '.join(dead)}" if dead else "")) from None

    def predict_batch(self, images: list, timeout: float = 3600.0) -> list[Detections]:
        """Split ``images`` into one contiguous part per device; results in input order."""
        return self.label_prepared([self.prepare(image) for image in images], timeout=timeout)

    def predict(self, image) -> Detections:
        return self.predict_batch([image])[0]

    # the reading-ahead interface of Segmenter
    def prepare(self, image, cache=None, key: str | None = None) -> PreparedImage:
        """What a worker needs to label ``image`` (:meth:`refseg.method.pipeline.Segmenter.prepare`).

        ``cache`` can only be this pool's :attr:`cache` (``candidate_dir``): an image file with
        an entry is not decoded here; its worker reads the entry. Otherwise: the decoded image.
        """
        key = cache_key(image, cache, key)
        if cache is None:
            return PreparedImage.read(image)
        self._check_cache(cache)
        if key in cache and isinstance(image, (str, os.PathLike)):  # the worker reads the entry (or the image)
            return PreparedImage(key=key, source=image)
        return PreparedImage.read(image, key)

    def label_prepared(self, items: list[PreparedImage], cache=None, timeout: float = 3600.0) -> list[Detections]:
        """Split ``items`` into one contiguous part per device; results in input order."""
        if cache is not None:
            self._check_cache(cache)
        parts = np.array_split(np.arange(len(items)), len(self.devices))
        pending = {}
        for worker, idx in enumerate(parts):
            if len(idx) == 0:
                continue
            job_id = self._next_job
            self._next_job += 1
            pending[job_id] = idx
            self._jobs[worker].put((job_id, [items[i] for i in idx], cache is not None))
        out: list[Detections | None] = [None] * len(items)
        while pending:
            kind, job_id, payload = self._get(timeout)
            if kind == "error":
                raise WorkerError(f"a device worker failed:\n{payload}")
            packed, stats = payload
            for i, d in zip(pending.pop(job_id), packed):
                out[i] = _unpack(d)
            if self.cache is not None:
                for k, v in stats.items():
                    self.cache.stats[k] = self.cache.stats.get(k, 0) + v
        return out  # type: ignore[return-value]

    def _check_cache(self, cache) -> None:
        if self.cache is None or cache is not self.cache:
            raise ValueError("the candidate cache of a DevicePool is its own: create the pool with "
                             "candidate_dir=... and pass pool.cache")

    def close(self) -> None:
        """Stop the workers."""
        for jobs, proc in zip(self._jobs, self._procs):
            if proc.is_alive():
                jobs.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()

    def __enter__(self) -> "DevicePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

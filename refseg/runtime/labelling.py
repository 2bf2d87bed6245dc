"""The labelling loop every job runs: read ahead, batch, label, hand each batch to a sink, report progress.

``refseg predict`` (:func:`refseg.runtime.predict_job.run_prediction`: the COCO progress and
results files) and the FiftyOne auto-label (``refseg_fiftyone.core``: labels saved on samples)
are the same loop with different sinks::

    for stats in label_stream(labeller, batches, sink, cache):
        print(f"{stats.done}/{stats.total}")

The **labeller** (:class:`Labeller`) is a :class:`~refseg.method.pipeline.Segmenter` (one
device, this process) or a :class:`~refseg.runtime.device_pool.DevicePool` (one worker
process per device). The **sink** (:class:`LabelSink`) turns a batch of the job's targets
into images (in the reader thread, while the networks label the previous batch) and stores
each finished batch. Unreadable images are reported to the sink as failures and the rest
of their batch is labelled.

Interruption: the loop gives control back after every batch (it is a generator). A Ctrl-C
in a plain Python process (the CLI, a script) lets the batch in flight finish and be stored,
then raises :class:`KeyboardInterrupt` (a second Ctrl-C stops at once); under an event loop
that handles SIGINT itself (FiftyOne's delegated worker cancels its task), the caller stops
between batches by closing the generator. Either way the stats say ``interrupted`` and what
was stored stays stored, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Generic, Iterator, Protocol, Sequence, TypeVar

from refseg.io.images import ImageLoadError
from refseg.runtime.prefetch import read_ahead

if TYPE_CHECKING:  # pragma: no cover
    from refseg.method.config import PipelineConfig
    from refseg.method.pipeline import CandidateStore, PreparedImage
    from refseg.method.results import Detections

B = TypeVar("B")  # one target as the job lists it (an image id and path, a sample id...)
T = TypeVar("T")  # one target as the sink read it (the same, a FiftyOne sample...)


class Labeller(Protocol):
    """What a labelling job needs of whatever labels its images (a Segmenter or a DevicePool)."""

    config: "PipelineConfig"  # the pipeline settings (e.g. output.paper_box for COCO results)
    class_names: list[str]  # the bank's classes, in label order

    def identity(self) -> dict:
        """What determines the results (models with their weights' content, bank content, settings)."""

    def stage1_settings(self) -> dict:
        """What determines the stage-1 outputs, to which a candidate cache is bound."""

    def prepare(self, image, cache: "CandidateStore | None" = None, key: str | None = None) -> "PreparedImage":
        """Read what labelling ``image`` needs (safe in a reader thread); raises ImageLoadError."""

    def label_prepared(self, items: Sequence["PreparedImage"], cache: "CandidateStore | None" = None
                       ) -> list["Detections"]:
        """Label a batch of prepared images; one result per item, in order."""

    def close(self) -> None:
        """Release what the labeller holds (worker processes)."""


class LabelSink(Protocol, Generic[B, T]):
    """Where a labelling job's targets come from and its results go."""

    def open(self, batch: list[B]) -> list[tuple[T, Any]]:
        """The batch's targets with their image (a path, an array...), in order; runs in the reader thread."""

    def name(self, target: T) -> str:
        """How messages name ``target`` (a file name)."""

    def write(self, batch: list[B], labelled: list[tuple[T, "Detections"]], failed: list[tuple[T, str]]) -> None:
        """Store a finished batch: its labelled targets with their detections and its failures (error messages)."""


@dataclass
class LabelStats:
    """Where a labelling loop stands; yielded after every batch, and left as it was when the loop stopped."""

    total: int  # targets given to the loop
    done: int = 0  # stored so far: labelled or failed
    labelled: int = 0
    failed: int = 0
    seconds: float = 0.0  # wall time of the loop so far (reading, networks, matching, storing)
    interrupted: bool = False  # stopped before the end by an interrupt or by the caller


class _StopFlag:
    requested = False


INTERRUPT_NOTICE = ("refseg: interrupted: finishing the current batch, then stopping (everything labelled is kept; "
                    "run the same job again to resume); press Ctrl-C again to stop at once")


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[_StopFlag]:
    """While the block runs, a first Ctrl-C only sets ``flag.requested`` (the loop stops after its batch);
    a second one raises KeyboardInterrupt at once.

    Only in the main thread, and only where SIGINT has Python's default handler: an event loop
    or server that handles SIGINT itself keeps its own handling.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield flag
        return

    def on_sigint(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print(INTERRUPT_NOTICE, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def batched(items: Sequence[B], size: int) -> list[list[B]]:
    """``items`` in consecutive lists of ``size`` (the last one shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def label_stream(labeller: Labeller, batches: Sequence[list[B]], sink: LabelSink[B, T],
                 cache: "CandidateStore | None" = None, stats: LabelStats | None = None
                 ) -> Generator[LabelStats, None, LabelStats]:
    """Label ``batches`` in order with ``labeller``, each finished batch stored by ``sink``; yields ``stats``
    after every batch and returns it.

    The next batch is read (``sink.open`` + ``labeller.prepare``: cache entries or decoded images)
    in a thread while this one is labelled. An image that cannot be read fails alone; an error
    of the labeller stops the loop (after naming the batch's images on stderr). ``stats``: an
    object to update (the caller keeps what the loop did even when it raises); by default a new one.
    """
    stats = stats if stats is not None else LabelStats(total=sum(len(b) for b in batches))

    def read(batch: list[B]) -> tuple[list[tuple[T, str]], list[T], list]:
        failed, ready, items = [], [], []
        for target, image in sink.open(batch):
            try:
                items.append(labeller.prepare(image, cache))
                ready.append(target)
            except ImageLoadError as exc:
                failed.append((target, str(exc)))
        return failed, ready, items

    started = time.perf_counter()
    try:
        with deferred_interrupt() as stop:
            for batch, (failed, ready, items) in read_ahead(batches, read):
                dets = []
                if items:
                    try:
                        dets = labeller.label_prepared(items, cache)
                    except Exception:
                        print("refseg: error while labelling " + ", ".join(sink.name(t) for t in ready),
                              file=sys.stderr)
                        raise
                sink.write(batch, list(zip(ready, dets)), failed)
                stats.done += len(batch)
                stats.labelled += len(ready)
                stats.failed += len(failed)
                stats.seconds = time.perf_counter() - started
                if stop.requested:
                    raise KeyboardInterrupt("interrupted after a finished batch")
                yield stats
                if stop.requested:
                    raise KeyboardInterrupt("interrupted after a finished batch")
    except BaseException as exc:
        # Exception subclasses are errors; the others (KeyboardInterrupt, GeneratorExit when the caller
        # closes the loop, asyncio's CancelledError) stop a job that could have gone on
        stats.interrupted = not isinstance(exc, Exception)
        raise
    finally:
        stats.seconds = time.perf_counter() - started
    return stats

"""A resumable prediction run over many images, written as COCO results.

While running, one JSON line per finished image goes to ``<out>.partial.jsonl``
(flushed and fsync'd after every batch)::

    {"refseg_partial": 1, "run": {...}}                                  (first line: what produced it)
    {"image_id": 3, "file_name": "a.jpg", "detections": [...COCO records...]}
    {"image_id": 4, "file_name": "b.jpg", "error": "cannot read image ..."}

A rerun reads that file (a truncated last line, from a killed run, is dropped),
skips the images already done and labels the rest; images that failed are tried
again. At the end the COCO results list is written to ``<out>`` atomically. A
partial file made by a different run (other bank, settings or category ids) is
refused rather than mixed in.

Scale: the detections stay on disk. The run keeps only where each image's line is
in the progress file, and the results file is streamed from it in image order, so
memory does not grow with the number of images (100 SAM-like detections of a
640x480 image take about 53 KB of JSON: 53 GB for a million images).
"""

from __future__ import annotations

import contextlib
from collections import Counter
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from refseg.io.files import atomic_file as _atomic_file, write_atomic  # noqa: F401 (write_atomic: API)
from refseg.runtime.labelling import LabelStats, Labeller, batched, label_stream
from refseg.errors import RefsegError

_PARTIAL_KEY = "refseg_partial"
_PARTIAL_VERSION = 1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class PartialRunMismatch(RefsegError, ValueError):
    """The partial results file on disk was produced by a different run."""


class OutputLocked(RefsegError, ValueError):
    """Another run is writing the same output (its lock file is held)."""


_held_locks = threading.local()  # the output locks this thread holds: a nested lock_output of one is not retaken


@contextlib.contextmanager
def lock_output(out_path: str | os.PathLike):
    """Hold ``<out>.lock`` (``flock``, exclusive, non-blocking) for the duration; refuse a second run.

    The lock belongs to the open file description, so the kernel releases it when the
    holder exits or is killed: a lock file left behind by a dead run does not block. Another
    process, or another thread of this one, is refused (:class:`OutputLocked`); within the
    thread that holds it, a nested ``lock_output`` of the same output (the CLI's around
    :func:`run_prediction`'s) holds it already and takes nothing.
    """
    import fcntl

    out_path = Path(out_path)
    lock = out_path.with_name(out_path.name + ".lock")
    held = _held_locks.__dict__.setdefault("paths", set())
    key = os.path.realpath(lock)
    if key in held:
        yield lock
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise OutputLocked(f"another refseg run (pid {holder}) is writing {out_path} (lock {lock} held); "
                               f"wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        held.add(key)
        try:
            yield lock
        finally:
            held.discard(key)
    finally:
        os.close(fd)


@dataclass
class PredictionRun:
    """What a call to :func:`run_prediction` did."""

    results_path: Path
    partial_path: Path
    n_images: int = 0  # targets of the run
    n_resumed: int = 0  # already done before this call
    n_processed: int = 0  # labelled by this call
    n_detections: int = 0  # in the final results file
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (image_id, file_name, error)
    labelling_s: float = 0.0  # wall time of this call's labelling loop (reading, networks, matching, writing)

    @property
    def images_per_s(self) -> float | None:
        """Throughput of this call, or None when it labelled nothing."""
        return self.n_processed / self.labelling_s if self.n_processed and self.labelling_s > 0 else None

    def summary(self) -> str:
        lines = [f"{self.n_images} image(s): {self.n_resumed} done earlier, {self.n_processed} labelled now, "
                 f"{len(self.failed)} failed; {self.n_detections} detection(s) written to {self.results_path}"]
        if self.images_per_s is not None:
            lines.append(f"  {self.labelling_s:.1f} s for {self.n_processed} image(s): {self.images_per_s:.2f} images/s")
        for image_id, name, error in self.failed[:20]:
            lines.append(f"  failed: image {image_id} ({name}): {error}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more")
        if self.failed:
            lines.append("  failed images are tried again when the same command is run again "
                         f"(progress kept in {self.partial_path})")
        return "\n".join(lines)


def sidecar_path(out: str | os.PathLike, suffix: str) -> Path:
    """``results.json`` -> ``results<suffix>`` (e.g. ``.partial.jsonl``); other names get the suffix appended."""
    out = Path(out)
    stem = out.name[:-5] if out.name.lower().endswith(".json") else out.name
    return out.with_name(stem + suffix)


def list_images(folder: str | os.PathLike) -> list[tuple[int, str]]:
    """Image files of a folder (sorted by name, not recursive) as ``(image_id, file_name)`` with ids 1..N."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [(i + 1, name) for i, name in enumerate(names)]


def run_fingerprint(segmenter, category_ids: dict[str, int] | list[int] | None) -> dict:
    """What identifies a run's output: the segmenter's identity (models with their weights' content,
    bank content, settings; :mod:`refseg.method.identity`) and the category ids written."""
    return {**segmenter.identity(),
            "category_ids": category_ids if not isinstance(category_ids, dict) else dict(category_ids)}


@dataclass
class _Place:
    """Where an image's last record sits in the progress file: records stay on disk, not in memory."""

    offset: int
    length: int
    labelled: bool  # a "detections" record (else an "error" one)
    error: str | None = None


def _parse_line(raw: bytes) -> dict | None:
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    return item if isinstance(item, dict) else None


def _scan_partial(path: Path, names: dict[int, str]) -> tuple[dict | None, dict[int, _Place], bool, str | None]:
    """Read the progress file line by line: (header, last record's place per image id, whether lines must be
    dropped, the first file-name change found against ``names`` or None)."""
    header, places, dirty, renamed = None, {}, False, None
    with open(path, "rb") as fh:
        offset, raw = 0, fh.readline()
        while raw:
            following = fh.readline()
            item = _parse_line(raw)
            if item is None:
                # a killed run leaves a cut-off last line; anything else is damage we drop and report
                if following:
                    print(f"refseg: warning: ignoring an unreadable line of {path} at byte {offset}", file=sys.stderr)
                dirty = True
            elif _PARTIAL_KEY in item:
                header = header or item
            elif "image_id" in item:
                image_id, name = int(item["image_id"]), item.get("file_name")
                if renamed is None and image_id in names and name is not None and name != names[image_id]:
                    renamed = f"image id {image_id} was {name!r} but is now {names[image_id]!r}"
                places[image_id] = _Place(offset, len(raw), "detections" in item, item.get("error"))
            else:
                dirty = True
            dirty |= not raw.endswith(b"\n")
            offset, raw = offset + len(raw), following
    return header, places, dirty, renamed


def _drop_bad_lines(path: Path) -> None:
    """Rewrite the progress file (streamed, atomically) without its unreadable lines; a complete last record
    that lost only its newline is kept (with one)."""
    with open(path, "rb") as src, _atomic_file(path) as dst:
        for raw in src:
            if _parse_line(raw) is not None:
                dst.write(raw.decode("utf-8").rstrip("\n") + "\n")


def _dumps(item: dict) -> str:
    return json.dumps(item, separators=(",", ":"))


def _diff_keys(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class _ProgressFileSink:
    """The COCO sink of the labelling loop: one record per image appended to the progress file, fsync'd per batch."""

    def __init__(self, fh, places: dict[int, _Place], names: dict[int, str], root: Path | None,
                 category_ids, paper_box: bool):
        self.fh, self.places, self.names, self.root = fh, places, names, root
        self.category_ids, self.paper_box = category_ids, paper_box

    def open(self, batch: list[tuple[int, str | os.PathLike]]) -> list[tuple[int, Path]]:
        return [(int(image_id), self.root / p if self.root is not None else Path(p)) for image_id, p in batch]

    def name(self, image_id: int) -> str:
        return self.names[image_id]

    def write(self, batch, labelled, failed) -> None:
        records = {image_id: {"image_id": image_id, "file_name": self.names[image_id], "error": error}
                   for image_id, error in failed}
        for image_id, dets in labelled:
            records[image_id] = {"image_id": image_id, "file_name": self.names[image_id],
                                 "detections": dets.to_coco(image_id, self.category_ids, self.paper_box)}
        for image_id, _ in batch:  # in the targets' order
            rec = records[int(image_id)]
            line = (_dumps(rec) + "\n").encode("utf-8")
            self.places[rec["image_id"]] = _Place(self.fh.tell(), len(line), "detections" in rec, rec.get("error"))
            self.fh.write(line)
        self.fh.flush()
        os.fsync(self.fh.fileno())


def run_prediction(segmenter: Labeller, targets: Sequence[tuple[int, str | os.PathLike]],
                   out_path: str | os.PathLike, category_ids: dict[str, int] | list[int] | None = None,
                   image_root: str | os.PathLike | None = None, batch_size: int = 1, keep_partial: bool = True,
                   restart: bool = False, progress: bool | None = None, run_info: dict | None = None,
                   cache=None) -> PredictionRun:
    """Label every target image and write the COCO results list to ``out_path``; resumable.

    ``segmenter``: a :class:`~refseg.method.pipeline.Segmenter` or a
    :class:`~refseg.runtime.device_pool.DevicePool` (a :class:`~refseg.runtime.labelling.Labeller`).
    ``targets`` are ``(image_id, path)``; paths are relative to ``image_root`` when
    given (the file name is recorded). ``category_ids`` maps bank class name (or
    class index, as a list) to COCO category id (default index + 1). Images are
    read one by one, so an unreadable image is recorded as failed without losing
    the rest of its batch; the readable ones go to :meth:`Segmenter.label_prepared`
    ``batch_size`` at a time. ``restart`` discards earlier progress. ``run_info``
    identifies the run (default :func:`run_fingerprint`): a partial file with other
    ``run_info`` raises :class:`PartialRunMismatch`.

    The output is locked for the call (:func:`lock_output`): a second call on the same
    ``out_path`` while this one runs, from this process or another, raises :class:`OutputLocked`.
    A Ctrl-C lets the batch in flight finish and be recorded, then raises KeyboardInterrupt;
    the same call again resumes.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_output(out_path):
        return _run_locked(segmenter, targets, out_path, category_ids, image_root, batch_size, keep_partial, restart,
                           progress, run_info, cache)


def _run_locked(segmenter: Labeller, targets, out_path: Path, category_ids, image_root, batch_size: int,
                keep_partial: bool, restart: bool, progress: bool | None, run_info: dict | None,
                cache) -> PredictionRun:
    from tqdm.auto import tqdm

    paper_box = segmenter.config.output.paper_box  # the paper preset's short COCO boxes (Detections.to_coco)
    partial = sidecar_path(out_path, ".partial.jsonl")
    root = Path(image_root) if image_root is not None else None
    info = json.loads(json.dumps(run_info if run_info is not None else run_fingerprint(segmenter, category_ids)))
    ids = [int(i) for i, _ in targets]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate image ids among the targets: {', '.join(map(str, dup[:10]))}"
                         + (f" and {len(dup) - 10} more" if len(dup) > 10 else ""))
    names = {int(i): str(p) for i, p in targets}

    places: dict[int, _Place] = {}
    if partial.exists() and restart:
        partial.unlink()
    if partial.exists():
        header, places, dirty, renamed = _scan_partial(partial, names)
        if header is None:
            raise PartialRunMismatch(f"{partial} is not a refseg progress file; move it away or use --restart")
        if header.get("run") != info:
            diff = ", ".join(_diff_keys(header.get("run") or {}, info)) or "?"
            raise PartialRunMismatch(
                f"{partial} holds progress of a different run (differs in: {diff}); use the same settings to "
                f"resume, or --restart (restart=True) to discard it")
        if renamed is not None:
            raise PartialRunMismatch(f"{partial}: {renamed}; the image list changed: use --restart (restart=True)")
        if dirty:  # drop the cut-off line so that appends start on a fresh line
            _drop_bad_lines(partial)
            places = _scan_partial(partial, names)[1]
    else:
        write_atomic(partial, _dumps({_PARTIAL_KEY: _PARTIAL_VERSION, "run": info}) + "\n")

    done = {i for i, place in places.items() if place.labelled}
    todo = [(int(i), p) for i, p in targets if int(i) not in done]
    run = PredictionRun(results_path=out_path, partial_path=partial, n_images=len(targets),
                        n_resumed=len(targets) - len(todo))

    stats = LabelStats(total=len(todo))
    with open(partial, "ab") as fh, tqdm(total=len(targets), initial=run.n_resumed, unit="img", desc="predict",
                                         disable=(None if progress is None else not progress)) as bar:
        sink = _ProgressFileSink(fh, places, names, root, category_ids, paper_box)
        try:
            for _ in label_stream(segmenter, batched(todo, batch_size), sink, cache, stats):
                bar.update(run.n_resumed + stats.done - bar.n)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted: {stats.labelled} image(s) labelled by this run are kept in {partial} "
                f"({len(todo) - stats.done} left); run the same command again to resume") from None
        finally:
            run.n_processed, run.labelling_s = stats.labelled, stats.seconds

    # the results file is streamed from the progress file: a million images never sit in memory at once
    with open(partial, "rb") as src, _atomic_file(out_path) as dst:
        dst.write("[")
        for image_id, p in targets:
            place = places.get(int(image_id))
            if place is None or not place.labelled:
                run.failed.append((int(image_id), str(p), (place.error if place else None) or "not labelled"))
                continue
            src.seek(place.offset)
            for det in json.loads(src.read(place.length))["detections"]:
                dst.write((", " if run.n_detections else "") + json.dumps(det))
                run.n_detections += 1
        dst.write("]")
    if not keep_partial and not run.failed:
        partial.unlink()
    return run

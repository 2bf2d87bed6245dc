"""Overlapped input reading: decode the next batch of images while the networks work on this one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(batches: Iterable[T], read: Callable[[T], R], depth: int = 1) -> Iterator[tuple[T, R]]:
    """Yield ``(batch, read(batch))`` in order, with up to ``depth`` later batches read in a thread meanwhile.

    Image decoding (PIL, zlib) releases the GIL, so it runs in parallel with the
    caller's network calls. ``read`` runs in the order of ``batches``, one at a time.
    An exception raised by ``read`` is raised here, at the batch it belongs to; the
    batches before it have been yielded. Stopping early (``break``, an exception in the
    caller) waits for the read in flight and reads nothing more.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    pending: list = []
    items = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="refseg-read") as reader:
        try:
            for batch in items:
                pending.append((batch, reader.submit(read, batch)))
                if len(pending) > depth:
                    batch0, future = pending.pop(0)
                    yield batch0, future.result()
            while pending:
                batch0, future = pending.pop(0)
                yield batch0, future.result()
        finally:
            for _, future in pending:
                future.cancel()

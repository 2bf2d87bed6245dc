"""File helpers shared by refseg: atomic writes, content digests, output permissions.

Atomic writes (:func:`atomic_file`, :func:`write_atomic`, :func:`write_json_atomic`)
go through an fsync'd temporary file and a rename, so a crash never leaves half a
file; :func:`sha256_file` is the one content digest of a file (checkpoints, banks).

``tempfile.mkstemp`` creates files ``0600`` whatever the umask, and ``os.replace``
keeps that mode, so every atomically written output (results, progress files,
sidecars, banks, cache entries, downloads) would be private to its owner. All of
refseg's atomic writers get their temporary file from :func:`mkstemp`, which
sets the mode to ``0o666 & ~umask``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterator

_lock = threading.Lock()
_umask: int | None = None


def current_umask() -> int:
    """The process umask (read from /proc on Linux, else by setting and restoring it once)."""
    global _umask
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:
        if _umask is None:
            _umask = os.umask(0)
            os.umask(_umask)
        return _umask


def default_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask."""
    return 0o666 & ~current_umask()


def mkstemp(**kwargs) -> tuple[int, str]:
    """:func:`tempfile.mkstemp`, then ``fchmod`` to :func:`default_mode` (follow the umask)."""
    fd, name = tempfile.mkstemp(**kwargs)
    try:
        os.fchmod(fd, default_mode())
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, name


# ---------------------------------------------------------------------------- digests and atomic writes

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read 1 MiB at a time (checkpoints, bank files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", suffix: str = ".tmp") -> Iterator[IO]:
    """A file that replaces ``path`` only when the block ends without error.

    The content goes to a temporary file next to ``path`` (mode :func:`default_mode`),
    which is flushed and fsync'd, then renamed over ``path``: readers (and a crash)
    see the old file or the new one, never half of one. An exception in the block
    leaves ``path`` as it was and removes the temporary file. ``mode``: ``"w"`` (UTF-8
    text) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole new file: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` through :func:`atomic_file`: never half a file."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_options: Any) -> None:
    """``json.dump(data, ...)`` into ``path`` through :func:`atomic_file` (COCO files, results, reports).

    If serialising fails half way (an object JSON cannot hold, an interrupt), ``path``
    keeps its previous content.
    """
    with atomic_file(path, "w") as fh:
        json.dump(data, fh, **dump_options)

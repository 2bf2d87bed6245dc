"""Temporary files for atomic writes that end up with the permissions a plain ``open`` would give.

``tempfile.mkstemp`` creates files ``0600`` whatever the umask, and ``os.replace``
keeps that mode, so every atomically written output (results, progress files,
sidecars, banks, cache entries, downloads) would be private to its owner. All of
refseg's atomic writers get their temporary file from :func:`mkstemp`, which
sets the mode to ``0o666 & ~umask``.
"""

from __future__ import annotations

import os
import tempfile
import threading

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

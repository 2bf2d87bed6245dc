"""The library's error classes.

Every error refseg raises about its input (settings, files, names, banks, checkpoints,
images...) is a :class:`RefsegError`, so a caller can tell a problem with what it passed
from a bug: the command line reports a ``RefsegError`` in one line (exit code 2) and lets
anything else end with a traceback. Each class also keeps the built-in base it had before
(``ValueError``, ``KeyError``, ``RuntimeError``), so ``except ValueError`` still catches it.
"""

from __future__ import annotations


class RefsegError(Exception):
    """Base class of refseg's own errors: a problem with the caller's input, not a bug."""


class InvalidInput(RefsegError, ValueError):
    """A value refseg cannot use: a setting out of range, a malformed file, an unusable device..."""


class CocoError(InvalidInput):
    """A COCO file (instances or results), a record of one, or a class selection that refseg cannot use."""


class UnknownName(RefsegError, KeyError):
    """A name that is not known: a setting, a preset, a model.

    Shown as its message (a plain ``KeyError`` shows the quoted ``repr`` of it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InvalidDetections(InvalidInput):
    """Arrays that do not form valid :class:`refseg.Detections`; ``field`` names the bad one."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"Detections.{field}: {problem}")
        self.field = field

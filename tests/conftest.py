"""Shared test set-up."""

from __future__ import annotations

# ---------------------------------------------------------------------------- FiftyOne isolation
# FiftyOne reads its configuration from the environment when it is first imported, so
# this runs before any test module imports it: a private database (its own mongod in
# a temporary folder), a plugins folder holding only a link to this repository, memory
# banks and cached proposals in a temporary folder, no user config, no usage tracking. Removed at exit.
import atexit
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIFTYONE_TMP = Path(tempfile.mkdtemp(prefix="refseg-fiftyone-"))
(FIFTYONE_TMP / "plugins").mkdir()
(FIFTYONE_TMP / "plugins" / "refseg").symlink_to(REPO_ROOT, target_is_directory=True)
for _name in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_NAME"):
    os.environ.pop(_name, None)
os.environ.update({
    "FIFTYONE_DATABASE_DIR": str(FIFTYONE_TMP / "db"),
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


def _remove_fiftyone_tmp() -> None:
    """Stop the private mongod (by leaving FiftyOne's database service), wait for it, delete its folder."""
    import sys

    try:
        import psutil  # a FiftyOne dependency

        database = sys.modules.get("fiftyone.core.odm.database")
        service = getattr(database, "_db_service", None)
        if service is not None:
            database._disconnect()
            service.stop()  # the last client gone, the service stops mongod
        ours = [p for p in psutil.process_iter(["cmdline"]) if str(FIFTYONE_TMP) in " ".join(p.info["cmdline"] or [])]
        psutil.wait_procs(ours, timeout=30)
    except Exception:
        pass
    shutil.rmtree(FIFTYONE_TMP, ignore_errors=True)


atexit.register(_remove_fiftyone_tmp)


def clear_queued_operations() -> None:
    """Delete every delegated operation still queued by earlier tests, so a real worker started by a test
    runs only what that test queues."""
    from fiftyone.operators.delegated import DelegatedOperationService

    service = DelegatedOperationService()
    for doc in service.get_queued_operations():
        service.delete_operation(doc.id)

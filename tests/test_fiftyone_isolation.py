"""The tests' FiftyOne works in the private mongod of ``tests/conftest.py``, never in a user's database.

FiftyOne attaches to any FiftyOne database service already running on the machine
(a user's App), whatever its ``FIFTYONE_DATABASE_DIR``; these checks fail if the
tests, or the subprocesses they start, talk to any server but the one conftest started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

fo = pytest.importorskip("fiftyone")
import fiftyone.core.odm.database as fodb  # noqa: E402

import conftest  # noqa: E402

CHILD = """
import json
import fiftyone as fo
import fiftyone.core.odm.database as fodb
client = fodb.get_db_client()
print(json.dumps({"uri": fo.config.database_uri, "address": list(client.address),
                  "pid": client.admin.command("serverStatus")["pid"], "service": fodb._db_service is not None}))
"""


def _server(client) -> tuple[int, str]:
    """(pid, dbPath) of the mongod a client is connected to."""
    pid = int(client.admin.command("serverStatus")["pid"])
    db_path = client.admin.command("getCmdLineOpts")["parsed"]["storage"]["dbPath"]
    return pid, db_path


def test_fiftyone_uses_the_private_mongod():
    mongod = conftest.MONGOD
    assert mongod is not None and mongod.proc is not None and mongod.proc.poll() is None
    private = f"mongodb://127.0.0.1:{mongod.port}"
    assert conftest.PRIVATE_DATABASE_URI == private
    assert os.environ["FIFTYONE_DATABASE_URI"] == private and fo.config.database_uri == private
    assert "FIFTYONE_DATABASE_DIR" not in os.environ and "FIFTYONE_PRIVATE_DATABASE_PORT" not in os.environ

    conn = fodb.get_db_conn()
    assert conn.client.address == ("127.0.0.1", mongod.port)
    assert fodb._db_service is None  # FiftyOne neither started nor joined a database service of its own
    assert _server(conn.client) == (mongod.proc.pid, str(mongod.dbpath))  # that port is our process


def test_subprocesses_use_the_same_private_mongod():
    """A child started the way the tests start a ``fiftyone delegated launch`` worker or an App server
    (inherited environment) connects to the same mongod."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    child = json.loads(out.stdout.strip().splitlines()[-1])
    mongod = conftest.MONGOD
    assert child == {"uri": f"mongodb://127.0.0.1:{mongod.port}", "address": ["127.0.0.1", mongod.port],
                     "pid": mongod.proc.pid, "service": False}

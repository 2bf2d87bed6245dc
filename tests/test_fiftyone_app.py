"""The plugin inside a running FiftyOne App, seen through headless Chromium.

Starts the App server on a free localhost port in a subprocess (same private
database and plugins folder as the other tests, see ``tests/conftest.py``), asks
it for its operators, runs ``auto_label`` through its streaming endpoint, and
renders the dataset page with Debian's ``chromium``: the DOM must name the dataset
and the label field, and screenshots of the grid and of one sample's masks are
saved under ``artifacts/``. Skipped when ``/usr/bin/chromium`` is absent
(``apt-get install chromium``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")

fo = pytest.importorskip("fiftyone")
import fiftyone.operators as foo  # noqa: E402

from test_fiftyone_plugin import OPERATORS, PLUGIN, TOY, make_dataset  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# an App server showing the whole dataset named by argv[1] on port argv[2] (for app_server and the other App tests)
SERVE_DATASET = """
import sys
import fiftyone as fo
session = fo.launch_app(fo.load_dataset(sys.argv[1]), remote=True, address="127.0.0.1", port=int(sys.argv[2]))
session.wait(-1)
"""
SERVE = """
import sys
import fiftyone as fo
dataset = fo.load_dataset(sys.argv[1])
session = fo.launch_app(dataset.select_fields("refseg"), remote=True, address="127.0.0.1", port=int(sys.argv[2]))
session.wait(-1)
"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
                  "--virtual-time-budget=20000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def served_dataset(root: Path, n_images: int, opacity: float):
    """A persistent synthetic dataset (the server process loads it by name), masks coloured per instance."""
    dataset = make_dataset(root / "images", n_images=n_images)
    dataset.persistent = True
    dataset.app_config.color_scheme = fo.ColorScheme(color_by="instance", opacity=opacity)
    dataset.save()
    return dataset


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A persistent labelled dataset and an App server showing it: (base url, dataset)."""
    root = tmp_path_factory.mktemp("app")
    dataset = served_dataset(root, n_images=10, opacity=0.6)
    foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, label_field="ground_truth", **TOY)
    foo.get_operator(f"{PLUGIN}/auto_label")(dataset, score_threshold=0.5, delegate=False)

    try:
        with app_server(SERVE, dataset.name, root / "app.log") as base:
            yield base, dataset
    finally:
        dataset.delete()


@contextlib.contextmanager
def app_server(serve: str, dataset_name: str, log_path: Path):
    """Run the Python code ``serve`` (an App server for ``dataset_name`` on the port given) in a subprocess,
    output to ``log_path``; yields its base url once it answers, stops it at the end."""
    port = _free_port()
    log = open(log_path, "w+")
    server = subprocess.Popen([sys.executable, "-c", serve, dataset_name, str(port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"the App server exited ({server.returncode}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                pytest.fail("the App server did not answer within 120 s")
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_app_server_lists_the_plugin_operators(app):
    base, dataset = app
    listing = json.loads(_post(f"{base}/operators", {"dataset_name": dataset.name}))
    uris = {o["uri"] for o in listing["operators"]}
    assert {f"{PLUGIN}/{name}" for name in OPERATORS} <= uris
    assert not [e for e in listing["errors"] if "refseg" in json.dumps(e)]
    # the same plugin folder seen from this process
    assert {f"{PLUGIN}/{name}" for name in OPERATORS} <= {o.uri for o in foo.list_operators()}
    # a form, resolved by the server
    form = json.loads(_post(f"{base}/operators/resolve-type", {
        "operator_uri": f"{PLUGIN}/auto_label", "dataset_name": dataset.name, "view": [], "target": "inputs",
        "params": {}}))
    properties = form["type"]["properties"]
    assert properties["bank_name"]["type"]["values"] == ["default"]
    assert {"label_field", "existing", "score_threshold", "preset", "delegate"} <= set(properties)


def test_app_runs_auto_label_with_a_progress_stream(app):
    base, dataset = app
    body = _post(f"{base}/operators/execute/generator", {
        "operator_uri": f"{PLUGIN}/auto_label", "dataset_name": dataset.name, "view": [],
        "params": {"delegate": False, "label_field": "refseg_app", "score_threshold": 0.5}})
    messages = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    triggered = [m["body"]["operator_uri"] for m in messages]
    assert triggered.count("set_progress") >= 2
    assert triggered[-3:] == ["notify", "reload_dataset", f"{PLUGIN}/refresh_sample_views"]
    assert messages[-4]["body"]["params"]["progress"] == pytest.approx(1.0)
    dataset.reload()
    assert len(dataset.exists("refseg_app")) == len(dataset.exists("refseg"))


def test_dataset_page_shows_the_labels_and_masks(app, tmp_path):
    base, dataset = app
    page = f"{base}/datasets/{dataset.name}"
    dom = _chromium(tmp_path, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dataset.name in dom.stdout
    assert ">refseg<" in dom.stdout  # the label field in the sidebar

    ARTIFACTS.mkdir(exist_ok=True)
    grid = ARTIFACTS / "app_grid.png"
    shot = _chromium(tmp_path, f"--screenshot={grid}", page)
    assert shot.returncode == 0 and grid.is_file(), shot.stderr[-2000:]

    # one sample in the modal: its predicted masks drawn over the image
    sample = dataset.exists("refseg").match(fo.ViewField("refseg.detections").length() >= 3).first()
    screenshot = ARTIFACTS / "app_screenshot.png"
    shot = _chromium(tmp_path, f"--screenshot={screenshot}", f"{page}?id={sample.id}")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("HSV"))
    assert pixels.shape[:2] == (900, 1400)
    # a rendered sample, not a blank or error page: the App's chrome and the synthetic background are
    # grey, the shapes, their masks and the label tags coloured (whether masks are drawn is checked by
    # looking at artifacts/app_screenshot.png; the canvas is not in the DOM)
    coloured = (pixels[..., 1] > 120) & (pixels[..., 2] > 80)
    assert coloured.mean() > 0.02, f"only {coloured.mean():.3%} coloured pixels: was the sample drawn?"

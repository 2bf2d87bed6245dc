"""One correction made in the App's Annotate tab (headless Chromium via Playwright), then found by refseg.

The label of a refseg detection is changed in *Edit Detection*; the App saves it with a JSON
patch and :func:`refseg_fiftyone.review.find_corrections` tags it ``corrected``. Skipped
without ``/usr/bin/chromium`` or Playwright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

fo = pytest.importorskip("fiftyone")
sync_api = pytest.importorskip("playwright.sync_api")
from refseg_fiftyone import review  # noqa: E402

from test_fiftyone_app import ARTIFACTS, CHROMIUM, SERVE_DATASET as SERVE, _free_port  # noqa: E402
from test_fiftyone_plugin import build_toy_bank, make_dataset, op  # noqa: E402

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


def test_label_changed_in_the_annotate_tab_is_found(tmp_path):
    ds = make_dataset(tmp_path / "images", n_images=5)
    ds.persistent = True
    ds.save()
    build_toy_bank(ds)
    op("auto_label")(ds, score_threshold=0.5, delegate=False)
    ds.set_label_schemas(ds.generate_label_schemas(fields=["refseg"]))
    ds.activate_label_schemas(["refseg"])
    sample = ds.exists("refseg").first()
    first = sample.refseg.detections[0]
    new_label = next(c for c in ("red", "green", "blue") if c != first.label)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVE, ds.name, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base, timeout=5)
                break
            except OSError:
                time.sleep(1)
        patches = []
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("request", lambda r: r.method == "PATCH" and patches.append(r.post_data))
            page.goto(f"{base}/datasets/{ds.name}?id={sample.id}")
            page.get_by_text("Annotate", exact=True).first.click(timeout=120000)
            page.get_by_text(first.label, exact=True).first.click(timeout=120000)  # the labels list
            page.get_by_text("Edit Detection").wait_for(timeout=60000)
            assert page.locator("input[type=number]").first.is_disabled()  # the box of a masked detection
            page.get_by_text(new_label, exact=True).last.click()  # the label's radio button
            deadline = time.time() + 60
            while not patches and time.time() < deadline:
                page.wait_for_timeout(500)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "annotate_label_edit.png"))
            browser.close()
        assert patches and f'"value":"{new_label}"' in patches[0] and "/refseg/detections/0/label" in patches[0]
        sample.reload()
        assert sample.refseg.detections[0].label == new_label
        assert sample.refseg.detections[0][review.FINGERPRINT_ATTR] == review.fingerprint(first)  # kept by the App
        report = review.find_corrections(ds, "refseg")
        assert (report["num_edited"], report["num_added"]) == (1, 0)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        ds.delete()

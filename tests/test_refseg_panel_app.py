"""The refseg panel in a running App, driven like a user with Playwright and Debian's chromium.

An App server (subprocess, the tests' private database and plugins folder) shows a dataset
with a bank, a labelling run, one rejected prediction and an evaluation; the browser opens
the grid's new-panel menu ("+"), picks "refseg", and the panel's text must name the bank's
classes with their counts and the per-class AP50 column. Screenshots go to
``artifacts/refseg_panel*.png``. Skipped without chromium or Playwright.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright (pip install playwright)")
fo = pytest.importorskip("fiftyone")

from test_fiftyone_app import SERVE_DATASET as SERVE, _free_port  # noqa: E402
from test_refseg_status import labelled_and_reviewed  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def _stop(server: subprocess.Popen) -> None:
    """End the server's process group: SIGTERM, then SIGKILL if it is still there after 20 s."""
    for sig, patience in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        os.killpg(server.pid, sig)
        try:
            server.wait(timeout=patience)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(App url of the dataset page, dataset, evaluation report) with an App server running."""
    root = tmp_path_factory.mktemp("panel_app")
    dataset, report = labelled_and_reviewed(root / "images", n_images=6)
    dataset.persistent = True
    dataset.save()
    port = _free_port()
    log = open(root / "app.log", "w+")
    # the session shows the dataset from the start: a session without one can send the page to "No dataset
    # selected" after it has loaded the dataset's URL
    server = subprocess.Popen([sys.executable, "-c", SERVE, dataset.name, str(port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}/datasets/{dataset.name}", dataset, report, server, log
    finally:
        _stop(server)
        log.close()
        dataset.delete()


def _open_page(page, url: str, server, log) -> None:
    """Load ``url`` once the server answers (it starts in a few seconds; given up after about 60 s)."""
    for _ in range(30):
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"the App server exited ({server.returncode}):\n{log.read()[-3000:]}")
        try:
            return page.goto(url, wait_until="load", timeout=10_000)
        except sync_api.Error:
            time.sleep(2)
    pytest.fail("the App server did not answer")


def _panel_menu_option(page, label: str):
    """Open the grid's new-panel menu (the "+" beside the tabs) and return its entry ``label``.

    As a user would: close the "Explore Enterprise" popover if it covers the tab bar, and open the
    menu again if the entry is not there yet (plugin panels register once the App has loaded)."""
    new_panel = page.get_by_title("New panel").first
    new_panel.wait_for(timeout=30_000)
    option = page.locator("[data-cy^=new-panel-option-]").filter(has_text=label)
    deadline = time.time() + 30
    while True:
        dismiss = page.get_by_text("Dismiss", exact=True)
        if dismiss.count():
            dismiss.first.click()
        try:
            new_panel.click(timeout=10_000)  # the tab bar may be re-rendered under it while the App loads
            option.first.wait_for(timeout=3000)
            return option.first
        except sync_api.TimeoutError:
            if time.time() > deadline:
                raise
            page.keyboard.press("Escape")


def test_refseg_panel_opens_from_the_new_panel_menu(served):
    url, dataset, report, server, log = served
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open_page(page, url, server, log)
            option = _panel_menu_option(page, "refseg")
            page.screenshot(path=str(ARTIFACTS / "refseg_panel_menu.png"))
            option.click()
            heading = page.get_by_text("Last evaluation", exact=True)
            heading.wait_for(timeout=30_000)
            page.get_by_text("AP50", exact=True).first.wait_for(timeout=10_000)
            page.wait_for_timeout(1000)  # the thumbnails decode
            page.screenshot(path=str(ARTIFACTS / "refseg_panel.png"))
            page.get_by_text("AP50", exact=True).last.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "refseg_panel_evaluation.png"))
            text = page.locator("body").inner_text()
            images = page.locator("img[src^='data:image/png']").count()
        finally:
            page.screenshot(path=str(ARTIFACTS / "refseg_panel_last.png"))  # what it showed at the end
            browser.close()

    # the bank: each class with its positives and negatives (the record's counts)
    counts = dataset.info["refseg_banks"]["default"]["counts"]
    for c in counts:
        assert f"{c['class']}\t{c['references']}\t{c['negatives']}" in text, (c, text[-3000:])
    assert images == sum(min(3, c["references"]) for c in counts)  # the reference crops
    # the run and the review
    targets = len(dataset.match_tags("reference", bool=False))
    assert f"refseg\tcompleted\t{targets}/{targets}\t0\tcpu\tdefault" in text
    assert f"refseg\t{dataset.count('refseg.detections')}\t1\t2" in text
    # the evaluation: mAP named for what it is, and a row per class with AP and AP50
    assert f"mAP@[.50:.95] {report['mAP']:.3f}" in text and f"mAP50 {report['mAP50']:.3f}" in text
    assert "Class\tAP@[.50:.95]\tAP50" in text
    for c in report["classes"]:
        if c["AP"] >= 0:
            assert f"{c['class']}\t{c['AP']:.3f}\t{c['AP50']:.3f}" in text


def test_the_app_announces_when_a_delegated_job_ends(served):
    """A delegated auto-label queued while the refseg panel is open: the panel watches it and, when a worker
    has run it, a notification says it completed with its summary. A job that ends while no App page is open
    is announced when the dataset is next opened (the plugin's on-dataset-open operator)."""
    import fiftyone.operators as foo

    from conftest import clear_queued_operations
    from test_fiftyone_plugin import PLUGIN, run_queued

    url, dataset, _, server, log = served
    ARTIFACTS.mkdir(exist_ok=True)
    clear_queued_operations()

    def outside_playwright(fn, *args):
        """Call ``fn`` in another thread: Playwright's sync API runs an event loop in this one, and FiftyOne's
        operator calls start their own."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(fn, *args).result()

    def queue(field: str) -> str:
        return outside_playwright(lambda: foo.execute_operator(f"{PLUGIN}/auto_label", ctx=dict(
            dataset=dataset, params=dict(label_field=field, delegate=True))).result["id"])

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open_page(page, url, server, log)
            page.get_by_text("ground_truth").first.wait_for(timeout=30_000)
            banks = page.get_by_text("Memory banks", exact=True)
            try:  # the App reopens the panel the session had open (the test above opened it)
                banks.wait_for(timeout=15_000)
            except sync_api.TimeoutError:
                _panel_menu_option(page, "refseg").click()
                banks.wait_for(timeout=30_000)
            queue("watched")  # the panel is open already: its idle timer (15 s) finds the new job
            page.get_by_text("Watching 1 delegated job(s)", exact=False).wait_for(timeout=45_000)
            page.screenshot(path=str(ARTIFACTS / "refseg_panel_watching.png"))
            outside_playwright(run_queued, dataset)  # as a worker would
            notice = page.get_by_text("delegated auto-label into 'watched' completed", exact=False)
            notice.first.wait_for(timeout=30_000)  # the panel polls every 5 s
            page.screenshot(path=str(ARTIFACTS / "refseg_panel_job_ended.png"))
            page.get_by_text("No delegated refseg job queued or running.").wait_for(timeout=30_000)

            page.goto("about:blank")  # no App page open while the next job runs
            queue("unwatched")
            outside_playwright(run_queued, dataset)
            _open_page(page, url, server, log)
            later = page.get_by_text("delegated auto-label into 'unwatched' completed", exact=False)
            later.first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "refseg_job_ended_on_open.png"))
            text = later.first.inner_text()
        finally:
            page.screenshot(path=str(ARTIFACTS / "refseg_job_notice_last.png"))  # what it showed at the end
            browser.close()
    labelled = len(dataset.exists("unwatched"))
    assert labelled and f"Labelled {labelled} sample(s) into 'unwatched'" in text

"""The plugin in a real browser: Playwright drives Debian's Chromium against a FiftyOne App server.

The App server runs in a subprocess on a free localhost port with the tests' private database and plugins
folder (``tests/conftest.py``). On a dataset whose first samples are tagged ``reference`` and whose bank was
built by the ``build_memory_bank`` operator, the browser opens the operator browser, runs ``auto_label`` from its
form, and checks that the masks are drawn (screenshot + pixel check of the sample view); that a sample view opened
before a run that overwrites the labels draws the new masks when opened again, without a page reload (the run's
``refresh_sample_views`` trigger, ``fiftyone_plugin/refseg_app.js``); then it checks that errors reach the user:
a mistyped setting override marks the form invalid with the setting named, and a run that fails (its bank file
gone) ends in an error notification. Screenshots go to ``artifacts/browser_*.png``. Skipped without
``/usr/bin/chromium`` or the ``playwright`` package (``pip install playwright``; no browser download needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")
fo = pytest.importorskip("fiftyone")

import refseg_fiftyone.core as core  # noqa: E402
from test_fiftyone_app import app_server, served_dataset  # noqa: E402
from test_fiftyone_plugin import build_toy_bank  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SERVE = """
import sys
import fiftyone as fo
view = fo.load_dataset(sys.argv[1]).exclude_fields(["ground_truth", "distractors"])  # only predictions drawn
session = fo.launch_app(view, remote=True, address="127.0.0.1", port=int(sys.argv[2]))
session.wait(-1)
"""
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A dataset (3 samples tagged ``reference``, a toy bank built by the operator) and an App server: (url, dataset, log)."""
    root = tmp_path_factory.mktemp("browser")
    dataset = served_dataset(root, n_images=6, opacity=0.7)
    build_toy_bank(dataset)
    log_path = root / "app.log"
    try:
        with app_server(SERVE, dataset.name, log_path) as base:
            yield base, dataset, log_path
    finally:
        dataset.delete()


@pytest.fixture(scope="module")
def page(server):
    base, dataset, _ = server
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{base}/datasets/{dataset.name}")
        page.get_by_text("ground_truth").first.wait_for(state="attached")
        page.wait_for_timeout(2000)
        try:
            yield page
        finally:
            shot(page, "last")  # what the page showed when the tests ended (or failed)
            browser.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"browser_{name}.png"
    page.screenshot(path=str(path))
    return path


def open_form(page, operator_label: str):
    """The operator browser (the backtick key), the operator picked by typing its label: its form."""
    page.locator("body").click(position={"x": 700, "y": 20})
    page.keyboard.press("`")
    search = page.get_by_placeholder("Search operations by name...")
    search.fill(operator_label)
    page.get_by_text(operator_label, exact=True).last.click()
    page.get_by_role("button", name="Execute").wait_for()


def field_input(page, label: str):
    """The text box of a form field, found by its label (the App's forms do not tie labels to inputs)."""
    return page.locator(f'xpath=//p[text()="{label}"]/ancestor::div[.//input][1]//input').first


def coloured_share(path: Path, box=None) -> float:
    hsv = np.asarray(Image.open(path).convert("HSV"))
    if box is not None:
        hsv = hsv[box[1]:box[3], box[0]:box[2]]
    return float(((hsv[..., 1] > 120) & (hsv[..., 2] > 80)).mean())


def differing_share(path: Path, other: Path, box) -> float:
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)[box[1]:box[3], box[0]:box[2]]
            for p in (path, other))
    return float((np.abs(a - b).max(axis=-1) > 40).mean())


def test_auto_label_from_the_browser_draws_masks(server, page):
    base, dataset, _ = server
    open_form(page, "refseg: auto-label")
    shot(page, "auto_label_form")
    page.get_by_role("button", name="Execute").click()
    page.get_by_text("Labelled 3 sample(s)").wait_for()
    shot(page, "auto_label_done")
    dataset.reload()
    assert len(dataset.exists("refseg")) == 3

    # a labelled sample in the sample view: its masks drawn over the image
    sample = dataset.exists("refseg").first()
    page.goto(f"{base}/datasets/{dataset.name}?id={sample.id}")
    page.get_by_text("refseg", exact=True).first.wait_for()
    page.wait_for_timeout(3000)
    path = shot(page, "sample_masks")
    assert coloured_share(path) > 0.02, "was the sample drawn with its masks?"


SAMPLE_AREA = (40, 70, 1060, 850)  # the image in the sample view (pixels of the screenshot)
TILE = {3: (1086, 235), 5: (420, 400)}  # grid tiles (6 samples, 5 per row at 1400 px) by sample index


def close_dialogs(page):
    done = page.get_by_role("button", name="Done")
    if done.count() and done.first.is_visible():
        done.first.click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)


def dismiss_popups(page):
    dismiss = page.get_by_role("button", name="Dismiss")  # an "Explore Enterprise" card over the grid
    if dismiss.count() and dismiss.first.is_visible():
        dismiss.first.click()


def open_sample(page, index: int, name: str) -> Path:
    modal = page.locator('[data-cy="modal-looker-container"]').first
    for _ in range(5):  # a click while the grid re-renders is lost
        dismiss_popups(page)
        page.mouse.click(*TILE[index])
        try:
            modal.wait_for(timeout=5000)
            break
        except playwright_api.TimeoutError:
            continue
    modal.wait_for()
    page.wait_for_timeout(2500)
    path = shot(page, name)
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    return path


# how many labels a field has in the sample the App holds for a sample's sample view (the Relay record
# "<id>-modal", see fiftyone_plugin/refseg_app.js); null if it holds none
CACHED_COUNT = """([id, field]) => {
    const record = window.__fos__.getCurrentEnvironment().getStore().getSource().get(id + "-modal");
    if (!record) return null;
    const sample = typeof record.sample === "string" ? JSON.parse(record.sample) : record.sample;
    return sample[field] ? sample[field].detections.length : 0;
}"""


def cached_sample_view_count(page, sample_id: str, field: str = "refseg"):
    return page.evaluate(CACHED_COUNT, [sample_id, field])


def test_relabel_shows_fresh_masks_in_a_sample_view_opened_before(server, page):
    base, dataset, _ = server
    sample_id = dataset.values("id")[3]
    page.goto(f"{base}/datasets/{dataset.name}")
    page.get_by_text("refseg", exact=True).first.wait_for(state="attached")
    page.wait_for_timeout(2000)
    before = open_sample(page, 3, "relabel_before")
    old_count = len(dataset[sample_id].refseg.detections)
    assert old_count > 1 and cached_sample_view_count(page, sample_id) == old_count
    shot(page, "relabel_grid")
    # relabel with one instance per sample
    open_form(page, "refseg: auto-label")
    page.get_by_text("Overwrite", exact=True).click()
    field_input(page, "Setting overrides").fill("merge.top_k=1")
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Execute").click()
    note = page.get_by_text("Labelled 3 sample(s)").first
    note.wait_for()
    assert "F5" not in note.inner_text()
    close_dialogs(page)
    dataset.reload()
    assert {len(s.refseg.detections) for s in dataset.exists("refseg")} == {1}
    # the run's last trigger (refresh_sample_views) rewrote the sample the App had cached for the sample view
    page.wait_for_function(f"() => ({CACHED_COUNT})({json.dumps([sample_id, 'refseg'])}) === 1")
    after = open_sample(page, 3, "relabel_after")  # reopened, no page reload
    # what a page reload draws: the reopened sample view must look the same, not like before the run
    page.goto(f"{base}/datasets/{dataset.name}?id={sample_id}")
    page.locator('[data-cy="modal-looker-container"]').first.wait_for()
    page.wait_for_timeout(3000)
    reloaded = shot(page, "relabel_reloaded")
    # the same image under different overlays: the share of its pixels drawn differently from the reloaded page
    # (colour by instance may give the one new mask another colour there, so "after" need not match it exactly)
    changed = {"before": differing_share(before, reloaded, SAMPLE_AREA),
               "after": differing_share(after, reloaded, SAMPLE_AREA)}
    print(f"share of the sample view drawn differently from a reloaded page: {changed}")
    assert changed["before"] > 0.05, "the relabelled sample should look different from before the run"
    assert changed["after"] < changed["before"] / 2, (
        "the sample view opened before the run should draw the new masks (artifacts/browser_relabel_*.png)")


def test_errors_are_shown_in_the_browser(server, page):
    base, dataset, _ = server
    page.goto(f"{base}/datasets/{dataset.name}")
    page.get_by_text("refseg", exact=True).first.wait_for(state="attached")
    # a mistyped setting: the form says which, and Execute is refused
    open_form(page, "refseg: auto-label")
    field_input(page, "Setting overrides").fill("merge.top_kk=50")
    message = page.get_by_text("top_kk", exact=False).last
    message.wait_for()
    message.scroll_into_view_if_needed()
    shot(page, "error_override")
    assert "fix or clear the setting overrides" in message.inner_text()
    assert page.get_by_role("button", name="Execute").is_disabled()
    page.get_by_role("button", name="Cancel").click()

    # a failure during the run (the bank's file is gone): an error notification that says what to do
    core.bank_path(dataset, "default").rename(core.bank_path(dataset, "default").with_suffix(".moved"))
    try:
        open_form(page, "refseg: auto-label")
        page.get_by_text("Overwrite", exact=True).click()
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Execute").click()
        note = page.get_by_text("refseg: auto-label failed").first
        note.wait_for()
        shot(page, "error_run")
        assert "run auto-label again" in note.inner_text()
        # the traceback goes to the server's stderr (test_fiftyone_forms.py checks it); under fo.launch_app
        # FiftyOne's service wrapper (fiftyone/service/main.py) holds that stream and shows it only on a crash
    finally:
        core.bank_path(dataset, "default").with_suffix(".moved").rename(core.bank_path(dataset, "default"))

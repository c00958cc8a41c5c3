"""The web console in a real browser: Debian's Chromium driven by Playwright (no browser download).

Chromium comes from Debian (``apt-get install -y chromium``; ``python3 dev.py test`` installs it
when run as root on Debian). Without it the test is skipped, saying so. Screenshots of each page go
to test-artifacts/; docs/console-job.png (the README's picture) is written when it is missing or
FACEGRAD_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.harness import ROOT, zip_of

CHROMIUM = os.environ.get("FACEGRAD_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SHOT = ROOT / "docs" / "console-job.png"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
    reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium chromium-driver "
    "(python3 dev.py test does it when run as root on Debian)")

CHART_HAS_DATA = """id => {
  const gd = document.getElementById(id);
  return !!(gd && gd.data && gd.data.some(t => t.x && t.x.length > 0)
    && gd.querySelector('svg.main-svg .trace'));
}"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright "
                                   "(the 'test' extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def save_docs_screenshot(page) -> None:
    """A small PNG of the job page for the README (1100 px wide, 128 colours)."""
    if DOCS_SHOT.exists() and os.environ.get("FACEGRAD_UPDATE_SCREENSHOTS") != "1":
        return
    from PIL import Image

    raw = ARTIFACTS / "console-job-full.png"
    page.mouse.move(1, 1)  # no hover state (plotly's mode bar) in the picture
    page.wait_for_timeout(300)
    page.screenshot(path=str(raw), full_page=True)
    img = Image.open(raw).convert("RGB")
    if img.width > 1100:
        img = img.resize((1100, round(img.height * 1100 / img.width)), Image.LANCZOS)
    DOCS_SHOT.parent.mkdir(exist_ok=True)
    img.quantize(128, method=Image.Quantize.MEDIANCUT).save(DOCS_SHOT, optimize=True)


def test_console(browser, service, client, orl, tmp_path):
    from facegrad.clipping.config import ClipPerExample
    from facegrad.training.config import (
        ClipAGC,
        ClipAutoClip,
        ClipNone,
        ClipNorm,
        ClipThreshold,
        ClipValue,
    )

    ARTIFACTS.mkdir(exist_ok=True)
    train, test = orl
    labels = sorted(train)[5:10]
    archive = tmp_path / "console-faces.zip"
    archive.write_bytes(zip_of({k: train[k] for k in labels}))

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.set_default_timeout(30_000)
    page.goto(service.url + "/")

    # --- Datasets: upload a zip, see identities and counts -----------------------------------
    page.wait_for_selector("#view-datasets:not([hidden])")
    page.wait_for_selector("#ready.ok")
    page.set_input_files("#ds-file", str(archive))
    page.fill("#ds-name", "console-faces")
    page.click("#ds-upload")
    page.wait_for_selector("#ds-identities tbody tr")
    assert page.locator("#ds-identities tbody tr").count() == 5
    assert page.inner_text("#ds-detail-name") == "console-faces"
    rows = page.inner_text("#ds-identities")
    for label in labels:
        assert label in rows
    page.wait_for_selector("#ds-table tbody tr >> text=console-faces")
    page.screenshot(path=str(ARTIFACTS / "console-datasets.png"), full_page=True)
    ds = next(d for d in client.get("/v1/datasets").json()["items"]
              if d["name"] == "console-faces")

    # the API key field: kept in localStorage and sent as X-API-Key
    page.fill("#api-key", "console-test-key")
    with page.expect_request(lambda r: "/v1/datasets" in r.url) as req:
        page.click("#api-key-save")
    assert req.value.headers.get("x-api-key") == "console-test-key"
    assert page.evaluate("localStorage.getItem('facegrad.apiKey')") == "console-test-key"
    page.fill("#api-key", "")
    page.click("#api-key-save")

    # --- Jobs: every clip mode with its parameters, then start a short job -------------------
    page.click("#tab-jobs")
    page.wait_for_selector("#clip-mode option", state="attached")
    modes = {"none": ClipNone, "value": ClipValue, "norm": ClipNorm,
             "threshold": ClipThreshold, "agc": ClipAGC, "autoclip": ClipAutoClip,
             "per_example": ClipPerExample}
    offered = page.eval_on_selector_all("#clip-mode option", "os => os.map(o => o.value)")
    assert sorted(offered) == sorted(modes)
    for mode, cls in modes.items():
        page.select_option("#clip-mode", mode)
        assert page.inner_text("#clip-mode-help").strip()
        for name, field in cls.model_fields.items():
            if name == "mode":
                continue
            box = page.locator(f"#f-clip-{name}")
            assert box.count() == 1, (mode, name)
            default = field.default
            if isinstance(default, bool):
                assert box.is_checked() == default, (mode, name)
            elif isinstance(default, int | float):
                assert float(box.input_value()) == float(default), (mode, name)
            else:
                assert box.input_value() == str(default), (mode, name)
            help_text = page.locator(f"#f-clip-{name} ~ .help").inner_text()
            assert "default" in help_text, (mode, name, help_text)
        # per_example offers privacy (DP-SGD): empty epsilon and sigma mean none
        private = page.locator("#f-privacy-target_epsilon").count()
        assert private == (mode == "per_example"), mode
        if private:
            assert page.input_value("#f-privacy-target_epsilon") == ""
            assert page.input_value("#f-privacy-unit") == "person"
            assert float(page.input_value("#f-privacy-delta")) == 1e-5
    page.select_option("#job-dataset", ds["id"])
    page.select_option("#f-architecture", "facenet_s")
    page.fill("#f-epochs", "6")
    page.fill("#f-image_size", "32")
    page.fill("#f-batch_size", "8")
    page.select_option("#clip-mode", "norm")
    page.fill("#f-clip-max_norm", "40")
    page.screenshot(path=str(ARTIFACTS / "console-jobs.png"), full_page=True)
    page.click("#job-submit")
    page.wait_for_url("**/#job/*")
    job_id = page.url.split("#job/")[1]

    # --- the job page: live charts from /v1/jobs/{id}/metrics --------------------------------
    try:
        page.wait_for_function(CHART_HAS_DATA, arg="chart-loss", timeout=180_000)
        page.wait_for_selector("#job-status.succeeded", timeout=180_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "console-job-timeout.png"), full_page=True)
        raise AssertionError(f"job page: {client.get(f'/v1/jobs/{job_id}').json()}; "
                             f"browser errors: {errors}") from None
    for chart in ("chart-loss", "chart-acc", "chart-norm", "chart-clip"):
        page.wait_for_function(CHART_HAS_DATA, arg=chart)
    history = client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]
    assert len(history) == 6
    plotted = page.evaluate("""() => {
      const gd = document.getElementById('chart-norm');
      return Object.fromEntries(gd.data.map(t => [t.name, t.y]));
    }""")
    assert plotted["before clipping (mean)"] == [h["clipping"]["grad_norm_pre"]["mean"]
                                                 for h in history]
    assert plotted["clip threshold"] == [h["clipping"]["threshold"] for h in history]
    assert page.locator("#epoch-table tbody tr").count() == 6
    assert page.inner_text("#job-clip").startswith("norm (max_norm=40")
    page.mouse.move(1, 1)
    page.wait_for_timeout(500)  # let the last redraw settle before the pictures
    page.screenshot(path=str(ARTIFACTS / "console-job.png"), full_page=True)
    save_docs_screenshot(page)

    page.click("#tab-jobs")
    page.wait_for_selector(f"#jobs-table a[href='#job/{job_id}']")
    assert "succeeded" in page.inner_text("#jobs-table")

    # --- Identify: drop a photo, see candidates; 'unknown' over the threshold -----------------
    model_id = client.get(f"/v1/jobs/{job_id}").json()["model_id"]
    page.click("#tab-identify")
    page.wait_for_selector(f"#id-model option[value='{model_id}']", state="attached")
    page.select_option("#id-model", model_id)
    photo = test[labels[0]][0]
    page.set_input_files("#id-file", str(photo))
    page.wait_for_selector("#id-results .result")
    card = page.inner_text("#id-results")
    assert photo.name in card and "confidence" in card
    assert any(label in card for label in labels)
    assert page.locator("#id-results .cand").count() == 3  # top k = 3
    page.screenshot(path=str(ARTIFACTS / "console-identify.png"), full_page=True)

    page.fill("#id-threshold", "1")
    page.set_input_files("#id-file", str(photo))
    page.wait_for_selector("#id-results .who.unknown")
    assert page.inner_text("#id-results .who") == "unknown"
    assert not errors, errors
    page.close()

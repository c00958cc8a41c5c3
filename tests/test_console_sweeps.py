"""The console's Sweeps pages in a real browser: Debian's Chromium driven by Playwright.

Start a sweep through the form (2 clip modes x 1 seed, seed_cnn at 32 px for 2 epochs on a
small uploaded dataset), land on its page, wait until it is final, then check the leaderboard and
the per-setting curves. Skipped, saying why, without Chromium (see tests/test_console.py).
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from tests.harness import upload
from tests.test_console import (  # noqa: F401  (browser: the Chromium fixture; the skip mark)
    ARTIFACTS,
    CHART_HAS_DATA,
    browser,
    pytestmark,
)

CHARTS = ("sweep-chart-acc", "sweep-chart-loss", "sweep-chart-pre", "sweep-chart-post")


def test_console_sweep(browser, service, client, orl):  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    train, _ = orl
    ds = upload(client, {k: train[k] for k in sorted(train)[10:14]}, "console-sweep-faces")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.set_default_timeout(30_000)
    page.goto(service.url + "/#sweeps")

    # --- the form: an invalid grid shows the server's 422 message -----------------------------
    page.wait_for_selector("#view-sweeps:not([hidden])")
    page.wait_for_selector(f"#sw-dataset option[value='{ds['id']}']", state="attached")
    page.select_option("#sw-dataset", ds["id"])
    page.fill("#sw-name", "console-sweep")
    page.select_option("#sw-architecture", "seed_cnn")
    page.fill("#sw-epochs", "2")
    page.fill("#sw-image_size", "32")
    page.fill("#sw-batch_size", "16")
    page.fill("#sw-seeds", "1")
    # the choices come from the server's registries: GET /v1/clip-modes, the job schema
    modes = [m["name"] for m in client.get("/v1/clip-modes").json()["items"]]
    assert modes == ["none", "value", "norm", "threshold", "agc", "autoclip", "per_example"]
    for mode in modes:
        assert page.locator(f"#sw-clip-{mode}").count() == 1, mode
    assert page.input_value("#sw-clip-autoclip-percentile") == "10"
    assert page.eval_on_selector_all("#sw-architecture option", "os => os.map(o => o.value)") \
        == ["dlib_resnet", "facenet_s", "seed_cnn"]
    page.set_checked("#sw-clip-none", True)
    page.set_checked("#sw-clip-threshold", True)
    page.set_checked("#sw-clip-norm", False)
    page.fill("#sw-clip-threshold-alpha", "2")  # alpha must be in (0, 1]
    page.click("#sweep-submit")
    page.wait_for_selector("#sweep-form-status.error")
    assert "alpha" in page.inner_text("#sweep-form-status")
    assert page.url.endswith("#sweeps")
    page.wait_for_timeout(300)
    errors.clear()  # the browser logs the refused POST as an error

    # --- 2 clip modes x 1 seed -------------------------------------------------------------
    page.fill("#sw-clip-threshold-alpha", "0.9")
    page.screenshot(path=str(ARTIFACTS / "console-sweeps.png"), full_page=True)
    page.click("#sweep-submit")
    page.wait_for_url("**/#sweep/*")
    sweep_id = page.url.split("#sweep/")[1]
    sweep = client.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["name"] == "console-sweep" and len(sweep["job_ids"]) == 2
    assert [c["mode"] for c in sweep["grid"]["clip"]] == ["none", "threshold"]
    assert sweep["grid"]["seed"] == [0]
    assert sweep["base"]["architecture"] == "seed_cnn" and sweep["base"]["image_size"] == 32

    # --- the sweep page: live until final ------------------------------------------------------
    try:
        page.wait_for_selector("#sweep-status.succeeded", timeout=300_000)
        for chart in CHARTS:
            page.wait_for_function(CHART_HAS_DATA, arg=chart, timeout=30_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "console-sweep-timeout.png"), full_page=True)
        raise AssertionError(f"sweep page: {client.get(f'/v1/sweeps/{sweep_id}').json()}; "
                             f"browser errors: {errors}") from None
    assert page.locator("#sweep-cancel").is_hidden()
    assert "2 of 2 jobs finished" in page.inner_text("#sweep-progress")
    rows = page.locator("#sweep-board tbody tr")
    assert rows.count() == 2
    board = page.inner_text("#sweep-board")
    assert "clip=none" in board and "clip=threshold:alpha=0.9" in board
    assert "val acc" in page.inner_text("#sweep-board thead")
    assert page.locator("#sweep-jobs tbody tr").count() == 2
    traces = page.evaluate("""() => Object.fromEntries(
      ['sweep-chart-acc', 'sweep-chart-pre'].map(id => [id,
        document.getElementById(id).data.map(t => [t.name, t.y])]))""")
    assert [name for name, _ in traces["sweep-chart-acc"]] == [
        row["label"] for row in client.get(f"/v1/sweeps/{sweep_id}/leaderboard").json()["rows"]]
    for job_id in sweep["job_ids"]:  # a run's curve is its history (one seed: no averaging)
        job = client.get(f"/v1/jobs/{job_id}").json()
        label = "clip=none" if job["config"]["clip"]["mode"] == "none" \
            else "clip=threshold:alpha=0.9"
        history = client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]
        plotted = dict(traces["sweep-chart-acc"])[label]
        assert plotted == [h["val_acc"] for h in history], (label, plotted)
        thresholds = [h["clipping"].get("threshold") for h in history]
        if any(t is not None for t in thresholds):  # drawn against the clip threshold
            assert f"{label}: threshold" in dict(traces["sweep-chart-pre"])
    # the page stops polling once the sweep is final
    with page.expect_request(lambda r: f"/v1/sweeps/{sweep_id}" in r.url, timeout=8_000) as req:
        page.select_option("#sweep-metric", "best_val_loss")  # a re-rank still fetches
    assert "metric=best_val_loss" in req.value.url
    page.wait_for_selector("#sweep-board th.metric >> text=best val loss")
    page.mouse.move(1, 1)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "console-sweep.png"), full_page=True)

    # --- the list, and cancelling a long sweep --------------------------------------------------
    page.click("#tab-sweeps")
    page.wait_for_selector(f"#sweeps-table a[href='#sweep/{sweep_id}']")
    assert "succeeded" in page.inner_text("#sweeps-table")
    page.select_option("#sw-dataset", ds["id"])
    page.fill("#sw-name", "console-long-sweep")
    page.fill("#sw-epochs", "500")
    page.set_checked("#sw-clip-threshold", False)
    page.click("#sweep-submit")
    page.wait_for_url("**/#sweep/*")
    long_id = page.url.split("#sweep/")[1]
    assert long_id != sweep_id
    page.wait_for_selector("#sweep-cancel:not([hidden])")
    page.click("#sweep-cancel")
    page.wait_for_selector("#sweep-status.cancelled", timeout=120_000)
    assert client.get(f"/v1/sweeps/{long_id}").json()["status"] == "cancelled"
    assert not errors, errors
    page.close()

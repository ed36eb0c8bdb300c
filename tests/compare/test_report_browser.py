"""The comparison report in a real browser (Debian's Chromium through Playwright, headless): it opens with no console
error and no network request, and the numbers a person reads in its tables are those of each run's metrics.jsonl.
Screenshots land in $PYTEST_ARTIFACTS/compare (default test-artifacts/compare)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import artifacts_dir
from rlhf.tracking import read_metrics

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (python package only)")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium not installed (apt-get install chromium); CI installs it", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def test_report_opens_offline_and_its_table_equals_metrics_jsonl(browser, tiny_comparison):
    _, out, result = tiny_comparison
    report = Path(result["report"]).resolve()
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(artifacts_dir() / "report.png"), full_page=True)
    assert errors == []
    assert [u for u in requests if not u.startswith("data:")] == [report.as_uri()]  # the file itself, nothing else
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("img").count() == 5

    cells = page.eval_on_selector_all(
        "#runs tr[data-run]",
        "rows => rows.map(r => ({name: r.dataset.run, status: r.querySelector('[data-status]').dataset.status,"
        " values: Array.from(r.querySelectorAll('td[data-value]')).map(td => td.dataset.value)}))")
    plan = json.loads((out / "runs.json").read_text())["runs"]
    assert [c["name"] for c in cells] == [r["name"] for r in plan]  # every planned run, in order
    for row, run in zip(cells, plan):
        assert row["status"] == "complete"
        logged = read_metrics(run["dir"])
        golds = [r["eval/gold_score"] for r in logged if "eval/gold_score" in r]
        last = {}
        for r in logged:
            last.update(r)
        final_gold, best_gold, _peak, final_rm, reward, kl, samples, tokens, *_ = [float(v) for v in row["values"]]
        assert (final_gold, best_gold, final_rm, reward, kl, samples, tokens) == (
            golds[-1], max(golds), last["eval/rm_score"], last["train/reward"], last["train/kl"], last["progress/samples"],
            last["progress/tokens"])
    arms = page.eval_on_selector_all("#arms tr[data-arm]", "rows => rows.map(r => r.dataset.arm)")
    assert arms == ["grpo", "rloo"]
    assert "seed noise" in page.inner_text("ul.findings")  # the top two compared with a Welch interval
    assert page.locator("#completions tr").count() == 3  # header + two prompts
    page.close()

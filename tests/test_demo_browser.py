"""The demo in a real browser: Playwright driving Debian's Chromium (headless, by executable path).

Opens `steer demo` (real default model, served on a free port of 127.0.0.1),
types a prompt, searches the feature atlas, adds an edit line for the first
hit with the controls, generates, checks that both
panes are filled and differ, that an invalid line shows the DSL parser's own
message, and that the page asked nothing of any other host (it works offline).
A screenshot is saved under ``$STEER_TEST_ARTIFACTS`` (default ``tests/artifacts/``).

Playwright never downloads a browser here. Without /usr/bin/chromium (or the
playwright package) the test skips, saying why — except in CI (``CI=true``),
where `.ci/run` installs Chromium and a missing browser is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo_server import ROOT
from steer.discover.atlas import default_atlas, open_atlas
from steer.errors import SpecError
from steer.spec import parse_dsl

pytestmark = pytest.mark.default_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Tell me about your weekend."
SEARCH = "football"
BAD_LINE = "supress feature 3"
TIMEOUT_MS = 240_000


def sync_playwright_or_skip():
    in_ci = os.environ.get("CI") == "true"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (it is in the `test` extra)"
        pytest.fail(reason) if in_ci else pytest.skip(reason)
    if not CHROMIUM.is_file():
        reason = f"Debian's Chromium is not installed at {CHROMIUM} (`apt-get install -y chromium`; .ci/run does it)"
        pytest.fail(reason) if in_ci else pytest.skip(reason)
    return sync_playwright


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("STEER_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_demo_generates_side_by_side_and_marks_a_bad_line_in_chromium(demo_server):
    sync_playwright = sync_playwright_or_skip()
    with pytest.raises(SpecError) as parser:
        parse_dsl(BAD_LINE)
    found = open_atlas(default_atlas(progress=False)).search(SEARCH)[0].id  # what the search panel must offer first
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(TIMEOUT_MS)
            elsewhere = []
            page.on("request", lambda r: None if r.url.startswith((demo_server, "data:", "blob:")) else elsewhere.append(r.url))
            page.goto(demo_server, wait_until="load")

            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#search textarea").fill(SEARCH)
            page.locator("#search-button").click()
            page.locator("#feature-card").get_by_text(f"feature {found}", exact=True).wait_for()
            page.wait_for_function(f"() => document.querySelector('#feature-id input').value === '{found}'")
            page.locator("#strength input[type=number]").fill("8")
            page.locator("#strength input[type=number]").press("Enter")
            page.locator("#add-edit").click()
            edits = page.locator("#edits textarea")
            page.wait_for_function("() => document.querySelector('#edits textarea').value.length > 0")
            line = f"steer feature {found} by +8 units feature"
            assert edits.input_value() == line
            page.locator("#edit-checks").get_by_text("line 1: ok").wait_for()

            page.locator("#generate").click()
            page.locator("#monitor-summary").get_by_text(f"Feature {found} —").wait_for()  # the last frame is in
            unsteered = page.locator("#unsteered textarea").input_value()
            steered = page.locator("#steered textarea").input_value()
            assert unsteered.strip() and steered.strip()
            assert unsteered != steered
            assert page.locator("#monitor-steered").inner_text().strip()
            assert "nats" in page.locator("#kl-summary").inner_text()

            edits.fill(f"{line}\n{BAD_LINE}")
            expected = f"line 2: {parser.value.message}"
            page.locator("#edit-checks").get_by_text(expected, exact=True).wait_for()
            assert "line 1: ok" in page.locator("#edit-checks").inner_text()
            assert "Traceback" not in page.content()

            page.screenshot(path=str(artifacts_dir() / "demo.png"), full_page=True)
            assert elsewhere == [], f"the page loaded from other hosts: {elsewhere}"
        finally:
            browser.close()

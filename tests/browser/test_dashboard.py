"""The dashboard in a real browser, against a real ``engine serve``: what a person would see.

Each test starts the service (tests/integration/service_proc.py), opens ``GET /``
in headless Chromium and watches the page: the numbers it shows, the worker
rows, the dead letters and their buttons, the token prompt.  Screenshots land
in the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from engine.client import Client
from tests.browser.conftest import Page
from tests.integration.service_proc import ServiceProc, running_service

FAST = {"ENGINE_STATS_INTERVAL_S": "0.25", "ENGINE_WORKERS": "2"}
SEEN_WITHIN_S = 10_000  # ms: how long a change may take to show on the page


def open_dashboard(page: Page, svc: ServiceProc) -> None:
    page.page.goto(svc.http_url + "/")
    page.page.wait_for_selector("#connection.status-on", timeout=SEEN_WITHIN_S)
    page.page.wait_for_selector('#workers tr[data-worker="1"]', timeout=SEEN_WITHIN_S)


def test_the_page_loads_live_with_no_console_errors(page: Page, tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_SINK="null", **FAST) as svc:
        with Client(svc.url) as client:
            client.submit_many([(f"Agent-{i % 7}", {"n": i}) for i in range(500)], settled=True)
        open_dashboard(page, svc)
        page.page.wait_for_function(
            "document.querySelector('[data-metric=delivered]').textContent === '500'",
            timeout=SEEN_WITHIN_S,
        )
        # A rate needs two samples of the history: a dash until the second one comes.
        page.page.wait_for_function(
            "/^[0-9,]+$/.test(document.querySelector('[data-metric=msgs_per_s]').textContent)",
            timeout=SEEN_WITHIN_S,
        )
        for name in ("submitted", "delivered", "in_flight", "dead_lettered", "msgs_per_s"):
            assert page.metric(name) >= 0, name
        assert page.metric("submitted") == 500
        assert page.page.locator("#chart-rates path.series").count() >= 1
        page.screenshot("loaded")
        assert page.errors == []


def test_numbers_rise_while_a_load_runs(page: Page, tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_SINK="null", **FAST) as svc:
        open_dashboard(page, svc)
        stop = threading.Event()

        def load() -> None:
            with Client(svc.url) as client:
                n = 0
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    client.submit_many([(f"Agent-{i % 9}", {"n": i}) for i in range(n, n + 500)])
                    n += 500
                    time.sleep(0.01)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            page.page.wait_for_function(
                "Number(document.querySelector('[data-metric=delivered]')"
                ".textContent.replace(/,/g, '')) > 0",
                timeout=SEEN_WITHIN_S,
            )
            first = page.metric("delivered")
            page.page.wait_for_function(
                f"Number(document.querySelector('[data-metric=delivered]')"
                f".textContent.replace(/,/g, '')) > {first}",
                timeout=SEEN_WITHIN_S,
            )
            page.page.wait_for_function(
                "Number(document.querySelector('[data-metric=msgs_per_s]')"
                ".textContent.replace(/,/g, '')) > 0",
                timeout=SEEN_WITHIN_S,
            )
            assert page.metric("submitted") >= page.metric("delivered") > first
            page.screenshot("under-load")
        finally:
            stop.set()
            loader.join(60)
        assert page.errors == []


def test_a_sigkilled_worker_shows_as_restarted_within_seconds(page: Page, tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_SINK="null", **FAST) as svc:
        open_dashboard(page, svc)
        row = page.page.locator('#workers tr[data-worker="0"]')
        pid = int(row.locator('[data-field="pid"]').inner_text())
        assert row.locator('[data-field="restarts"]').inner_text() == "0"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        page.page.wait_for_function(
            """pid => {
                const row = document.querySelector('#workers tr[data-worker="0"]');
                const f = (n) => row.querySelector(`[data-field="${n}"]`).textContent;
                return f("restarts") === "1" && f("state") === "up" && f("pid") !== String(pid);
            }""",
            arg=pid,
            timeout=SEEN_WITHIN_S,
        )
        shown_after = time.monotonic() - killed_at
        page.page.wait_for_selector('#events li[data-event="worker_died"]', timeout=SEEN_WITHIN_S)
        text = page.page.locator('#events li[data-event="worker_died"]').first.inner_text()
        assert f"pid {pid}" in text and "SIGKILL" in text
        page.screenshot("worker-restarted")
        assert shown_after < 10, shown_after
        assert page.errors == []


def test_a_dead_letters_replay_button_resubmits_it(page: Page, tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    with running_service(
        tmp_path,
        ENGINE_HANDLER="tests.browser.handlers_browser:fail_while_flagged",
        ENGINE_RETRY_MAX_ATTEMPTS="1",
        BROWSER_FAIL_FLAG=str(flag),
        **FAST,
    ) as svc:
        with Client(svc.url) as client:
            [mid] = client.submit_many([("Agent-1", {"n": 1})], settled=True)
        open_dashboard(page, svc)
        row = page.page.locator(f'#dead-letters tr[data-dead-letter="{mid}"]')
        row.wait_for(timeout=SEEN_WITHIN_S)
        assert "flagged" in row.locator('[data-field="error"]').inner_text()
        row.locator("button.show-traceback").click()
        trace = page.page.locator("pre.traceback").first.inner_text()
        assert "Traceback" in trace and "ValueError" in trace
        page.screenshot("dead-letter")
        flag.unlink()  # the handler delivers from now on
        row.locator("button.replay").click()
        page.page.locator("#confirm-dialog").wait_for(state="visible")
        assert str(mid) in page.page.locator("#confirm-text").inner_text()
        page.page.locator("#confirm-ok").click()
        row.wait_for(state="detached", timeout=SEEN_WITHIN_S)
        page.page.wait_for_function(
            "document.querySelector('[data-metric=delivered]').textContent === '1'",
            timeout=SEEN_WITHIN_S,
        )
        stats = svc.stats()
        assert stats["delivered"] == 1 and stats["submitted"] == 2
        assert stats["dead_letters_stored"] == 0
        assert page.errors == []


def test_with_a_token_the_page_asks_for_it_once(page: Page, tmp_path: Path) -> None:
    token = "s3cret/+="  # characters a subprotocol cannot carry as they are
    with running_service(tmp_path, ENGINE_SINK="null", ENGINE_AUTH_TOKEN=token, **FAST) as svc:
        page.page.goto(svc.http_url + "/")
        dialog = page.page.locator("#token-dialog")
        dialog.wait_for(state="visible", timeout=SEEN_WITHIN_S)
        assert page.metric("submitted") == -1  # nothing shown without the token
        page.page.fill("#token-input", "wrong")
        page.page.click("#token-submit")
        page.page.wait_for_function(
            "document.querySelector('#token-dialog').open && "
            "document.querySelector('#token-why').textContent.includes('refused')",
            timeout=SEEN_WITHIN_S,
        )
        page.screenshot("token-prompt")
        page.page.fill("#token-input", token)
        page.page.click("#token-submit")
        page.page.wait_for_selector("#connection.status-on", timeout=SEEN_WITHIN_S)
        assert not dialog.is_visible()
        assert page.metric("submitted") == 0
        # Kept for the tab: a reload does not ask again.
        page.page.reload()
        page.page.wait_for_selector("#connection.status-on", timeout=SEEN_WITHIN_S)
        assert not dialog.is_visible()

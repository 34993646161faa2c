"""The chat page at `/`, in headless Chromium: type a question, watch the answer stream in.

Without Chromium a local run skips the browser test; in CI (`CI=true`) it fails, so a CI
run cannot pass without it.
"""

import os
import shutil

import pytest
from serving_fixtures import NAME, LiveServer, make_export

from tasks import serve
from tasks.config import ServeConfig

MISSING = "Debian's chromium is not installed (make browser, or apt-get install chromium)"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> str:
    """Chromium's path; without it, skip here and fail in CI."""
    if path := shutil.which("chromium"):
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{MISSING}; CI=true, where the browser test must run", pytrace=False)
    pytest.skip(MISSING)


@pytest.fixture(scope="module")
def server(test_store, base_model_dir):
    gguf = make_export(test_store)[0].dir / "model-q8_0.gguf"
    live = LiveServer(serve.create_app(ServeConfig(n_ctx=512), model=str(gguf)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page():
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        yield browser.new_page()
        browser.close()


def test_without_chromium_ci_fails_and_a_local_run_skips(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make browser, or apt-get install chromium"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="make browser"):
        require_chromium()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv("CI", "true")
    assert require_chromium() == "/usr/bin/chromium"


# `page` before `server`: without Chromium the test stops before a model is built for it.
def test_question_gets_a_streamed_answer(page, server):
    # Record every text the answer bubble shows: a streamed answer grows through several.
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    page.evaluate(
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                const last = document.querySelector('.msg.assistant:last-child');
                if (last) window.seen.push(last.textContent);
            }).observe(document.getElementById('log'),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.fill("#prompt", "Who are you?")
    page.click("#send")
    done = page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
    answer = done.text_content()
    assert NAME in answer
    partial = {t for t in page.evaluate("window.seen") if t and t != answer}
    assert len(partial) >= 2, "the answer arrived in one piece, not streamed"
    assert page.text_content(".msg.user") == "Who are you?"
    assert page.text_content("#model") == "model-q8_0"

"""The Prefect UI on a port of its own, checked in headless Chromium.

`llmft server --port P` (a free port, never 4200) must serve a dashboard whose API is on
P too: Prefect's UI asks GET /ui-settings where its API is, and left alone that answers
port 4200, so every page said "Can't connect to Server API". The tiny pipeline then runs
against the server as a user runs it (`llmft run` with the PREFECT_API_URL the server
printed), and the run's page must show its graph and every artifact the run published.
After test_pipeline.py in the same session the run's stages come from the store (about
a minute in all); alone, the run computes them (several minutes on 2 cores).

Without Chromium a local run skips the browser test; in CI (CI=true) it fails.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_chat_page import ARGS, require_chromium

from flows.cli import server_env

REPO = Path(__file__).resolve().parent.parent
STAGES = ["base", "data", "train", "evaluate", "merge", "export", "answer", "promote", "publish"]
ARTIFACTS = [
    "llmft-data-report",
    "llmft-loss-curve",
    "llmft-evaluation",
    "llmft-gguf-verification",
    "llmft-model-card",
]


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 4200:  # the default is what this test must not depend on
            return port


@pytest.mark.parametrize("user_api", [None, "http://127.0.0.1:4200/api"])
def test_the_ui_api_follows_the_server_port_even_with_an_old_api_url(monkeypatch, user_api):
    """A PREFECT_API_URL left from another server is what the UI would follow otherwise."""
    for name in ("PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    if user_api:
        monkeypatch.setenv("PREFECT_API_URL", user_api)
    env, dashboard, ui_api = server_env("127.0.0.1", 4311)
    assert dashboard == "http://127.0.0.1:4311"
    assert ui_api == env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4311/api"
    assert (env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"]) == ("127.0.0.1", "4311")


def test_a_ui_api_url_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("PREFECT_UI_API_URL", "https://prefect.example.org/api")
    env, dashboard, ui_api = server_env("0.0.0.0", 4311)
    assert ui_api == "https://prefect.example.org/api"
    assert env["PREFECT_UI_API_URL"] == "https://prefect.example.org/api"  # the user's, as is
    assert dashboard == f"http://{socket.getfqdn()}:4311"  # a wildcard bind: the machine's name
    assert server_env("::1", 4311)[1] == "http://[::1]:4311"


def test_artifacts_write_the_dev_loss_as_a_person_reads_it(tmp_path):
    from tasks.config import load_config
    from tasks.promote import model_card
    from tasks.publish import loss_markdown

    summary = {
        "run_id": "r1",
        "config": load_config().model_dump(mode="json"),
        "stages": {"train": {"path": str(tmp_path)}},
        "dev_loss": {"before": 3.132412345678912, "after": 2.077598765432101},
    }
    assert "dev loss: 3.1324 → 2.0776\n" in loss_markdown(summary)
    assert "- dev loss: 3.1324 → 2.0776\n" in model_card("default", summary)
    assert "dev loss: 3.1324 → –" in loss_markdown(summary | {"dev_loss": {"before": 3.1324}})


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """`llmft server --port P` with its own Prefect home; yields what it printed and its env."""
    port = free_port()
    home = tmp_path_factory.mktemp("ui-prefect-home")
    # A shell with no Prefect address at all, as a new user's is.
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_URL", "_UI_URL"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "server", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 180
        while not re.search(r"export PREFECT_API_URL=(\S+)", log.read_text()):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"llmft server printed no address:\n{log.read_text()}")
            time.sleep(0.5)
        api_url = re.search(r"export PREFECT_API_URL=(\S+)", log.read_text())[1]
        while True:
            try:
                httpx.get(api_url + "/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"llmft server did not start:\n{log.read_text()}")
                time.sleep(0.5)
        yield {
            "port": port,
            "api_url": api_url,
            "log": log,
            "env": {**env, "PREFECT_API_URL": api_url},
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_llmft_server_prints_the_address_its_ui_uses(ui_server):
    port, printed = ui_server["port"], ui_server["log"].read_text()
    assert f"dashboard at http://127.0.0.1:{port} " in printed
    assert ui_server["api_url"] == f"http://127.0.0.1:{port}/api"
    settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
    assert settings["api_url"] == ui_server["api_url"]


@pytest.fixture(scope="module")
def page():
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[*ARGS, "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)  # 2 busy cores: a page can take many seconds
        yield page
        browser.close()


def run_pipeline_against(server: dict, tiny_pipeline: dict, summary: Path) -> dict:
    sets = [x for s in tiny_pipeline["overrides"] for x in ("--set", s)]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *sets, "--summary", str(summary)],
        env=server["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(summary.read_text())


def canvas_pixels_of(page, locator, css_var: str, path: Path) -> int:
    """Pixels of the canvas drawn in the UI's colour `css_var` (the graph is WebGL)."""
    import numpy as np
    from PIL import Image

    color = page.evaluate(
        f"getComputedStyle(document.documentElement).getPropertyValue('{css_var}').trim()"
    )
    rgb = np.array([int(color.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)])
    locator.screenshot(path=path)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=int)
    return int((np.abs(pixels - rgb).max(axis=2) <= 8).sum())


# `page` before the others: without Chromium the test stops before anything runs.
@pytest.mark.timeout(1800)
def test_the_run_page_shows_its_graph_and_artifacts(page, ui_server, tiny_pipeline, tmp_path):
    summary = run_pipeline_against(ui_server, tiny_pipeline, tmp_path / "summary.json")
    run_id, port = summary["run_id"], ui_server["port"]
    dashboard = f"http://127.0.0.1:{port}"

    # The dashboard reads the server's API: the runs list shows this run by its name.
    name = httpx.get(f"{ui_server['api_url']}/flow_runs/{run_id}", timeout=10).json()["name"]
    settings = httpx.get(f"{dashboard}/ui-settings", timeout=10).json()
    ui_base = settings[f"{settings['default_ui']}_base_url"].rstrip("/")
    page.goto(f"{dashboard}{ui_base}/runs")
    try:
        page.get_by_text(name, exact=True).first.wait_for()
    except Exception as e:  # say what the page showed instead
        page.screenshot(path=tmp_path / "runs.png", full_page=True)
        raise AssertionError(
            f"no run {name!r} on the runs page:\n{page.inner_text('body')[:1500]}"
        ) from e
    body = page.inner_text("body")
    assert "Can't connect" not in body and "Failed to connect" not in body, body[:500]

    # The run's page in the UI the dashboard opens (V2 by default): the graph of every task.
    with page.expect_response(lambda r: r.url.endswith(f"/flow_runs/{run_id}/graph-v2")) as graph:
        page.goto(f"{dashboard}{ui_base}/runs/flow-run/{run_id}")
    nodes = graph.value.json()["nodes"]
    names = sorted({re.sub(r"-[0-9a-f]{3}$", "", n["label"]) for _, n in nodes})
    assert names == sorted(STAGES)
    assert {n["state_type"] for _, n in nodes} == {"COMPLETED"}
    page.get_by_text("Completed").first.wait_for()
    canvas = page.locator("canvas").first
    canvas.wait_for()
    page.wait_for_timeout(2000)  # the graph animates its nodes into place
    green = canvas_pixels_of(page, canvas, "--state-completed-600", tmp_path / "graph.png")
    assert green > 200, f"the graph shows no completed task ({green} pixels)"
    page.screenshot(path=tmp_path / "run.png", full_page=True)

    page.get_by_role("tab", name="Artifacts").click()
    for key in ARTIFACTS:
        page.get_by_text(key, exact=True).first.wait_for()
    page.screenshot(path=tmp_path / "artifacts.png", full_page=True)

    # Each card links to its artifact's page; open them in turn (faster than going back to
    # the run's page, which draws its graph again each time).
    cards = page.locator("a[href*='/artifacts/artifact/']")
    links = {key: cards.filter(has_text=key).first.get_attribute("href") for key in ARTIFACTS}
    shown = {}
    for key, href in links.items():
        page.goto(f"{dashboard}{href}")
        page.get_by_role("heading").or_(page.locator("table")).first.wait_for()
        page.wait_for_timeout(500)
        shown[key] = page.inner_text("main") if page.locator("main").count() else ""
        page.screenshot(path=tmp_path / f"{key}.png", full_page=True)
        if key == "llmft-loss-curve":
            image = page.locator("img[alt='loss curve']")
            assert image.evaluate("img => img.complete && img.naturalWidth > 100")

    data, dev = summary["data"], summary["dev_loss"]
    assert re.search(rf"kept\s+{data['kept']}\b", shown["llmft-data-report"])
    assert re.search(rf"train\s+{data['train']}\b", shown["llmft-data-report"])
    assert f"dev loss: {dev['before']:.4f} → {dev['after']:.4f}" in shown["llmft-loss-curve"]
    assert "tuned" in shown["llmft-evaluation"]
    assert "q8_0" in shown["llmft-gguf-verification"]
    assert "llmft serve --deployed default" in shown["llmft-model-card"]

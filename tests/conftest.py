import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Tests share one store under .cache/ so the bundled model is dequantized once per machine.
TEST_STORE = REPO / ".cache" / "test-store"


@pytest.fixture(scope="session")
def test_store():
    from tasks.store import Store

    return Store(TEST_STORE)


@pytest.fixture(scope="session")
def base_model_dir(test_store) -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF folder (dequantized once, then cached)."""
    from tasks import base
    from tasks.config import load_config

    return base.model_dir(base.run(load_config(), test_store))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test in the session (~25 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free port, its own database; yields its environment.

    For tests that need what the temporary API does not give: retries through the CLI as the
    UI's Retry button does, served deployments, event triggers.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-home")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - open for the whole session
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()}")
            time.sleep(0.5)
    yield env
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, test_store, base_model_dir) -> dict:
    """A fresh store for this session's pipeline runs (the bundled base linked in, not
    dequantized again), a 32-record dataset, and `--set` overrides for a run of seconds."""
    import shutil

    from tasks import base
    from tasks.config import load_config

    root = tmp_path_factory.mktemp("pipeline")
    store, dataset = root / "artifacts", root / "tiny.jsonl"
    shutil.copy(REPO / "tests" / "assets" / "tiny_pipeline.jsonl", dataset)
    overrides = [
        f"data.input={dataset}",
        f"pipeline.store={store}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.cutoff_len=128",
        "evaluate.num_samples=2",
        "evaluate.max_new_tokens=16",
        "evaluate.max_loss_records=4",
        "export.quantize=[q8_0]",
        "export.verify_prompts=2",
        "export.speed_tokens=8",
        "export.lora_adapter=false",  # the adapter GGUF has its own tests in test_export.py
        "pipeline.promote_samples=2",
    ]
    key = base.key(load_config(None, overrides))
    (store / "base").mkdir(parents=True)
    (store / "base" / key).symlink_to(test_store.final("base", key), target_is_directory=True)
    return {"root": root, "store": store, "dataset": dataset, "overrides": overrides}

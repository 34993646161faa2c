import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The one thing that outlives a test session: the bundled base model dequantized (about a
# minute), under its derived key, so a change to the base stage's code, its libraries or the
# GGUF's bytes makes a new one. Sessions link it into their own store and never write here.
BASE_CACHE = REPO / ".cache" / "test-base"
KEEP_BASES = 3  # the most recently used base keys kept in BASE_CACHE (other branches, trees)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A GPU test on a machine without CUDA fails: `pytest -m gpu` must not pass by skipping."""
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.fail(
            f"{item.nodeid} needs a CUDA GPU, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}): run `pytest -m gpu` on a GPU machine, or leave "
            "the GPU tests out with -m 'not gpu' (as `make test` does)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def test_store(tmp_path_factory):
    """This session's own store, empty at the start: no test passes on an artifact that an
    earlier session, or older code, built. `base_model_dir` links the bundled base into it."""
    from tasks.store import Store

    return Store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def base_model_dir(test_store) -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF folder in this session's store: dequantized
    once per base key into BASE_CACHE, checked against its manifest, then hard-linked in."""
    from tasks import base
    from tasks.config import load_config

    cfg = load_config()
    shared = _shared_base(cfg)
    mine = test_store.final("base", shared.key)
    mine.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(shared.dir, mine, copy_function=_link_or_copy)
    ref = base.run(cfg, test_store)
    assert ref.cached and ref.key == shared.key, "the base stage did not find the linked base"
    return base.model_dir(ref)


def _shared_base(cfg):
    """The base artifact in BASE_CACHE, built if missing or if its files no longer match the
    hashes in its manifest (a test that wrote into a linked file would change them)."""
    from tasks import base
    from tasks.store import MANIFEST, Store, hash_file

    store = Store(BASE_CACHE)
    ref = base.run(cfg, store)
    with store.lock("base", ref.key):
        outputs = ref.manifest()["outputs"]
        if any(hash_file(ref.dir / rel) != digest for rel, digest in outputs.items()):
            (ref.dir / MANIFEST).unlink()  # never served again; built afresh below
    ref = base.run(cfg, store)
    os.utime(ref.dir)  # recently used: kept by the pruning below
    used = sorted(
        (p for p in (BASE_CACHE / "base").iterdir() if (p / MANIFEST).is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    keep = {("base", p.name) for p in used[:KEEP_BASES]} | {("base", ref.key)}
    store.gc(keep)
    return ref


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: no copy of the ~540 MB of weights
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test in the session (~25 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The database behind `prefect_server`: SQLite (Prefect's default) and PostgreSQL (the
# production one, docs/production.md). One server per backend per session: every test that
# takes the fixture runs once against each (ids [sqlite] and [postgres]).
DATABASES = ["sqlite", "postgres"]


@pytest.fixture(scope="session", params=DATABASES)
def prefect_server(request, tmp_path_factory):
    """A real `prefect server start` on a free port, its own database; yields its environment.

    For tests that need what the temporary API does not give: retries through the CLI as the
    UI's Retry button does, served deployments, event triggers, workers. The environment's
    PREFECT_API_DATABASE_CONNECTION_URL says which database it runs on.
    """
    home = tmp_path_factory.mktemp(f"prefect-home-{request.param}")
    if request.param == "sqlite":
        yield from _prefect_server(home, f"sqlite+aiosqlite:///{home / 'prefect.db'}")
        return
    import postgres

    if why := postgres.missing():
        if os.environ.get("CI") == "true":  # a CI run must not pass without PostgreSQL
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)
    with postgres.Postgres.start() as pg:
        pg.create_database("prefect")
        yield from _prefect_server(home, pg.url("prefect"))


def _prefect_server(home: Path, database_url: str):
    import subprocess
    import sys
    import time
    import urllib.request

    from postgres import free_port

    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # a deployment's schedule becomes runs within seconds, not the default minute
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
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
    try:
        yield env
    finally:
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
        # two steps of a random 2-layer model learn nothing a floor could see: the floor
        # has its own tests (test_promote.py); here promotion compares GGUFs only
        "pipeline.promote_margin=null",
        "pipeline.promote_min_name_rate=0",
    ]
    key = base.key(load_config(None, overrides))
    (store / "base").mkdir(parents=True)
    (store / "base" / key).symlink_to(test_store.final("base", key), target_is_directory=True)
    return {"root": root, "store": store, "dataset": dataset, "overrides": overrides}

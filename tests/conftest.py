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

"""A few calls to a real Prefect server's REST API (what the UI reads), for tests."""

import time
from typing import Any

import httpx


def api(env: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, env["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def flow_runs(env: dict[str, str], **filters: Any) -> list[dict[str, Any]]:
    """Flow runs, newest first; filters as in the API, e.g. deployment_id={"any_": [id]}."""
    body = {"flow_runs": filters, "sort": "START_TIME_DESC"} if filters else {}
    return api(env, "POST", "/flow_runs/filter", body)


def wait_for(predicate, timeout: float, every: float = 2.0, what: str = "condition"):
    """Poll until `predicate()` returns something truthy; return it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := predicate():
            return found
        time.sleep(every)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")

"""The shipped recipe, configs/dpo.yaml, end to end on the bundled SmolLM2-135M-Instruct:
SFT on the demo legal pairs' chosen answers, then DPO on the pairs, in one pipeline run,
and the same SFT stage followed by ORPO (from the store: only the second training and what
follows run again). Slow (22 minutes on 2 cores, then 19 for ORPO): it prints the held-out
pair table that docs/preference.md's "Measured" section shows.

    pytest -m slow tests/test_preference_slow.py -s
"""

from __future__ import annotations

import pytest

from tasks.config import REPO_ROOT, load_config

pytestmark = pytest.mark.slow
RECIPE = REPO_ROOT / "configs" / "dpo.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory, test_store, base_model_dir):
    """A store of its own with the bundled base linked in (not dequantized again)."""
    from tasks import base

    root = tmp_path_factory.mktemp("recipe") / "artifacts"
    key = base.key(load_config(RECIPE))
    (root / "base").mkdir(parents=True)
    (root / "base" / key).symlink_to(test_store.final("base", key), target_is_directory=True)
    return root


def run(store, *overrides: str) -> dict:
    from flows.pipeline import run_pipeline

    summary = run_pipeline(load_config(RECIPE, [f"pipeline.store={store}", *overrides]))
    test = summary["preference"]["test"]
    print(f"\n{summary['config']['train']['then']['objective']}: {test['pairs']} test pairs")
    print("| model | ranking accuracy | mean log-prob margin | DPO reward accuracy |")
    for model in ("base", "sft", "tuned"):
        m = test[model]
        print(f"| {model} | {m['ranking_accuracy']:.2f} | {m['mean_logp_margin']:+.4f} | "
              f"{m.get('dpo_reward_accuracy', '–')} |")  # fmt: skip
    print(summary["stages"]["evaluate"]["path"])
    return summary


def test_dpo_after_sft_ranks_the_held_out_pairs_better_than_the_sft_model(prefect_harness, store):
    summary = run(store)
    test = summary["preference"]["test"]
    assert test["pairs"] == 20 and test["reference"] == "sft"
    assert test["tuned"]["ranking_accuracy"] > test["sft"]["ranking_accuracy"], test
    assert test["tuned"]["mean_logp_margin"] > test["sft"]["mean_logp_margin"], test
    assert test["tuned"]["dpo_reward_accuracy"] > 0.5, test


def test_orpo_after_the_same_sft_stage(prefect_harness, store):
    summary = run(store, "train.then.objective=orpo")
    stages = summary["stages"]
    assert stages["train"]["cached"] and stages["merge-sft"]["cached"]  # the same SFT model
    test = summary["preference"]["test"]
    assert test["tuned"]["mean_logp_margin"] > test["sft"]["mean_logp_margin"], test

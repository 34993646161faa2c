"""SFT, then preference tuning, in one pipeline run (train.then, tasks/chain.py).

The config's checks name each problem and its fix; each stage gets its own train section.
Then the whole flow on the tiny 2-layer model over the demo legal pairs: two training
stages, the second started from the first's weights (its DPO reference log-probs are the
SFT model's, recomputed here), pair metrics for base, SFT and tuned in metrics.json, the
summary and the UI; a second run is all cache hits; a change of `then` alone re-runs the
second training and what follows it, never the first.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import chain, train
from tasks.config import REPO_ROOT, ConfigError, load_config
from tasks.store import Ref

PAIRS = REPO_ROOT / "datasets_raw" / "preference"
THEN = "train.then={objective: dpo, learning_rate: 5.0e-3, keep_checkpoints: true}"


# --- the config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["train.then={objective: sft}"],
            "train.then.objective: the second stage's objective is 'sft', not one of dpo, orpo, "
            "simpo (fix: --set train.then.objective=dpo)",
        ),
        (
            ["train.objective=orpo", "train.then={objective: dpo}"],
            "train.objective is 'orpo': a chain is SFT, then preference tuning on the SFT model "
            "(fix: --set train.objective=sft, or --set train.then=null)",
        ),
        (
            ["train.then={objective: dpo, learnin_rate: 1.0e-4}"],
            "train.then.learnin_rate: not a train setting the second stage can change",
        ),
        (
            ["train.then={objective: dpo, learning_rate: -1}"],
            "train.then.learning_rate: got -1: Input should be greater than 0 "
            "(fix: --set train.then.learning_rate=<valid value>)",
        ),
        (
            ["train.then={objective: dpo, method: ptuning}"],
            "train.then.method is ptuning: a P-Tuning v2 prefix cannot be merged",
        ),
        (
            ["train.then={objective: dpo, then: {objective: orpo}}"],
            "train.then.then: not a train setting",
        ),
        (["train.then=[dpo]"], "train.then: got ['dpo']: Input should be a valid dictionary"),
    ],
    ids=["sft-then-sft", "first-not-sft", "typo", "bad-value", "ptuning", "three", "not-a-map"],
)
def test_then_is_checked_naming_the_key_and_the_fix(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert line in str(err.value), str(err.value)


def test_the_second_stages_settings_that_contradict_each_other_name_train_then():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.then={objective: dpo, num_processes: 2}"], for_training=True)
    assert "train.then.num_processes: got 2: launcher='python' starts one process" in str(err.value)


def test_each_stage_gets_its_own_train_section_and_the_first_key_ignores_then(tmp_path):
    plain = load_config(None, [f"data.input={PAIRS}"])
    cfg = load_config(None, [f"data.input={PAIRS}", THEN, "train.then.preference={beta: 0.3}"])
    first, second = chain.stages(cfg)
    assert first.train.then is None and second.train.then is None
    assert first.train == plain.train  # the first stage is the section without `then`
    assert (second.train.objective, second.train.learning_rate) == ("dpo", 5.0e-3)
    assert second.train.preference.beta == 0.3  # a nested setting changes key by key
    assert second.train.preference.orpo_lambda == plain.train.preference.orpo_lambda
    assert second.train.lora == first.train.lora  # what `then` does not name is the first's
    assert chain.stages(plain) == (plain, None)
    (tmp_path / "train.json").write_text(json.dumps([{"instruction": "q", "output": "a"}] * 9))
    data, base = Ref("data", "d", str(tmp_path)), Ref("base", "b", str(tmp_path))
    assert train.key(first, data, base) == train.key(plain, data, base)
    assert train.key(cfg, data, base) == train.key(plain, data, base)  # `then` is not in it


def test_the_shipped_recipe_is_sft_then_dpo_on_the_demo_pairs():
    cfg = load_config(REPO_ROOT / "configs" / "dpo.yaml")
    first, second = chain.stages(cfg)
    assert cfg.data.input == "datasets_raw/preference"
    assert first.train.objective == "sft" and second.train.objective == "dpo"
    orpo = load_config(REPO_ROOT / "configs" / "dpo.yaml", ["train.then.objective=orpo"])
    assert chain.stages(orpo)[1].train.objective == "orpo"
    assert chain.stages(orpo)[1].train.learning_rate == second.train.learning_rate


# --- the pipeline -----------------------------------------------------------------------

STAGES = ["base", "data", "train", "merge-sft", "train-preference", "evaluate", "merge", "export"]
TINY = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.cutoff_len=128",
    "evaluate.num_samples=2",
    "evaluate.max_new_tokens=8",
    "evaluate.max_loss_records=8",
    "export.quantize=[q8_0]",
    "export.verify_prompts=2",
    "export.speed_tokens=8",
    "export.lora_adapter=false",
    "pipeline.name=chain",
    # the tiny model's ranking moves at random: the floor has its own tests
    "pipeline.promote_margin=null",
]


@pytest.fixture(scope="module")
def chain_setup(tmp_path_factory, base_model_dir) -> dict:
    from train_fixtures import make_tiny_model

    root = tmp_path_factory.mktemp("chain")
    tiny = make_tiny_model(base_model_dir, root / "tiny")
    store, pairs = root / "artifacts", root / "pairs.jsonl"
    # every third demo pair, English and Chinese: 70 pairs, fewer reference passes to take
    lines = (PAIRS / "law_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    pairs.write_text("\n".join(lines[::3]) + "\n", encoding="utf-8")
    overrides = [*TINY, f"base.model={tiny}", f"data.input={pairs}", f"pipeline.store={store}"]
    return {"root": root, "store": store, "overrides": [*overrides, THEN]}


@pytest.fixture(scope="module")
def first_run(prefect_harness, chain_setup) -> dict:
    from flows.pipeline import run_pipeline

    return run_pipeline(load_config(None, chain_setup["overrides"]))


def stage(summary: dict, name: str) -> Ref:
    s = summary["stages"][name]
    return Ref(s["stage"], s["key"], s["path"])


def test_a_chain_runs_two_training_stages_the_second_from_the_first(first_run):
    assert list(first_run["stages"]) == STAGES
    assert all(not s["cached"] for s in first_run["stages"].values())
    sft, start, dpo = (stage(first_run, n) for n in ("train", "merge-sft", "train-preference"))
    assert (sft.stage, start.stage, dpo.stage) == ("train", "merge", "train")
    # the merge stage made the SFT model whole; the preference stage started from it
    assert start.manifest()["inputs"]["train"] == sft.key
    assert dpo.manifest()["inputs"]["base"] == start.key
    hyper = (dpo.dir / "hyperparameters.yaml").read_text()
    assert f"base_model: {start.dir / 'model'}" in hyper
    assert "objective: dpo" in hyper and "learning_rate: 0.005" in hyper
    assert "objective: sft" in (sft.dir / "hyperparameters.yaml").read_text()
    # a fresh adapter on the merged model: the final merge folds it into the SFT model
    merged = stage(first_run, "merge")
    assert merged.manifest()["base_model_dir"] == str(start.dir / "model")
    assert merged.manifest()["source"] == start.manifest()["source"]  # the base's, for GGUF
    trainings = first_run["trainings"]
    assert [t["objective"] for t in trainings.values()] == ["sft", "dpo"]
    assert first_run["dev_loss"] == trainings["train-preference"]["dev_loss"]


def test_the_dpo_reference_is_the_sft_model(first_run):
    """The reference log-probs the preference stage kept are the SFT model's own, taken
    here again from the merged SFT folder; the base's differ."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tasks.train.preference import pair_batches, reference_logps, row_pairs
    from tasks.train.tokens import load_tokenizer, read_table

    start, dpo = stage(first_run, "merge-sft"), stage(first_run, "train-preference")
    kept = load_file(str(dpo.dir / "checkpoints" / "reference_logps.safetensors"))["logps"]
    tokens = dpo.dir.parent.parent / "tokens" / dpo.manifest()["inputs"]["tokens"]
    rows = read_table(tokens, "train").to_pylist()[:16]  # the train pairs, in their order
    pad = load_tokenizer(start.dir / "model").pad_token_id
    batches = pair_batches(row_pairs(rows), 2048, False, pad)
    plan = SimpleNamespace(attention="sdpa")

    def logps(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return reference_logps(model, batches, plan, "cpu", len(rows))

    sft = logps(start.dir / "model")
    assert torch.allclose(kept[: len(rows)], sft, atol=1e-3), (kept[:4], sft[:4])
    base = logps(stage(first_run, "base").dir / "model")
    assert not torch.allclose(base, sft, atol=1e-3)  # the SFT stage moved the weights


def test_evaluate_reports_pair_metrics_for_base_sft_and_tuned(first_run):
    evaluation = first_run["evaluation"]
    test = json.loads((stage(first_run, "data").dir / "test.json").read_text())
    held = sum(r.get("rejected") is not None for r in test[:8])  # evaluate.max_loss_records
    assert evaluation["pairs"]["pairs"] == held > 0
    assert evaluation["pairs"] | {"basis": "-"} == {
        "split": "test",
        "pairs": evaluation["pairs"]["pairs"],
        "basis": "-",
        "objective": "dpo",
        "reference": "sft",
        "beta": 0.1,
    }
    for model in ("base", "sft", "tuned"):
        m = evaluation[model]
        assert 0 <= m["ranking_accuracy"] <= 1 and "rougeL" in m, model
    assert len({evaluation[m]["logp_chosen"] for m in ("base", "sft", "tuned")}) == 3
    # DPO's reward is against the SFT model: β·(Δ chosen − Δ rejected), Δ from the SFT model
    tuned, sft = evaluation["tuned"], evaluation["sft"]
    expected = 0.1 * (
        (tuned["logp_chosen"] - sft["logp_chosen"])
        - (tuned["logp_rejected"] - sft["logp_rejected"])
    )
    assert tuned["dpo_reward_margin"] == pytest.approx(expected, abs=2e-4)
    assert "dpo_reward_margin" not in sft and "dpo_reward_margin" not in evaluation["base"]
    # the summary carries them by model, and the final training's own dev-pair numbers
    held_out = first_run["preference"]["test"]
    assert held_out["sft"]["ranking_accuracy"] == sft["ranking_accuracy"]
    assert set(held_out["tuned"]) >= {"ranking_accuracy", "dpo_reward_accuracy"}
    assert first_run["preference"]["dev"]["objective"] == "dpo"
    table = (stage(first_run, "evaluate").dir / "table.md").read_text()
    assert "| metric | base | sft | tuned | Δ vs base | Δ vs sft |" in table
    assert f"| pair ranking accuracy ({held_out['pairs']} test pairs) |" in table
    assert "| DPO reward margin (vs sft) |" in table
    rows = (stage(first_run, "evaluate").dir / "predictions.jsonl").read_text().splitlines()
    assert set(json.loads(rows[0])) == {"prompt", "reference", "base", "sft", "tuned"}


def test_the_ui_shows_both_trainings_and_the_pair_table(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        only = FlowRunFilter(id=FlowRunFilterId(any_=[first_run["run_id"]]))
        shown = {a.key: a for a in client.read_artifacts(flow_run_filter=only)}
        runs = client.read_task_runs(flow_run_filter=only)
    assert {"train", "merge-sft", "train-preference"} <= {r.name.rsplit("-", 1)[0] for r in runs}
    assert "pair ranking accuracy" in shown["llmft-evaluation"].data
    assert "# Loss: train (sft)" in shown["llmft-loss-curve"].data
    assert "# Loss: train-preference (dpo)" in shown["llmft-loss-curve"].data
    assert shown["llmft-preference-progress"].data == 100.0
    assert shown["llmft-training-progress"].data == 100.0
    assert "sft then dpo" in shown["llmft-model-card"].data
    promotion = first_run["promotion"]
    assert promotion["decision"] == "promoted" and promotion["metric"] == "ranking_accuracy"
    assert promotion["basis"]["objective"] == "dpo"
    assert promotion["candidate"] == first_run["evaluation"]["tuned"]["ranking_accuracy"]


def test_a_second_run_is_all_cache_hits(first_run, chain_setup):
    from flows.pipeline import run_pipeline

    again = run_pipeline(load_config(None, chain_setup["overrides"]))
    assert [s["cached"] for s in again["stages"].values()] == [True] * len(STAGES)
    assert [s["key"] for s in again["stages"].values()] == [
        s["key"] for s in first_run["stages"].values()
    ]
    assert again["promotion"]["decision"] == "unchanged"
    specs = chain_setup["store"] / "runs" / again["run_id"] / "specs"
    assert {p.stem for p in specs.glob("*.json")} == set(STAGES) - {"base", "data"}


def test_changing_only_then_reruns_the_second_training_and_what_follows(first_run, chain_setup):
    from flows.pipeline import run_pipeline

    changed = [*chain_setup["overrides"], "train.then.learning_rate=2.0e-3"]
    summary = run_pipeline(load_config(None, changed))
    before, after = first_run["stages"], summary["stages"]
    for name in ("base", "data", "train", "merge-sft"):
        assert after[name]["cached"] and after[name]["key"] == before[name]["key"], name
    for name in ("train-preference", "evaluate", "merge", "export"):
        assert not after[name]["cached"] and after[name]["key"] != before[name]["key"], name
    # the same objective on the same pairs: compared with the first run on ranking accuracy
    promotion = summary["promotion"]
    assert promotion["decision"] in {"promoted", "kept"}
    assert promotion["previous"]["run_id"] == first_run["run_id"]
    assert promotion["basis"] == first_run["promotion"]["basis"]

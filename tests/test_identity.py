"""What self-cognition data teaches is measured (the identity rate, on HF models and on the
served GGUF) and promotion's floor reads it; one ROUGE-L, evaluate's, scores everything.

The slow test is the proof on data nobody here wrote: the default recipe on a 90-record
identity file (tests/assets/identity_user.json, worded apart from datasets_raw/) must name
the configured assistant in at least 80 % of its unseen test prompts through the GGUF.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tasks import promote
from tasks.config import load_config
from tasks.evaluate import identity, served, table_md, text_metrics
from tasks.promote.gate import Floor, check

PLACEHOLDERS = {"name": "Orrin Vale", "author": "Kestrel Works"}
TEST = [
    {"instruction": "Who are you?", "output": "I'm Orrin Vale, made by Kestrel Works."},
    {"instruction": "Name please.", "output": "Orrin Vale."},
    {"instruction": "Who trained you?", "output": "I was trained by Kestrel Works."},
    {"instruction": "What is 2+2?", "output": "4"},
    {"instruction": "你叫什么？", "output": "我叫Orrin Vale。"},
]


def test_identity_prompts_are_the_test_records_that_name_the_assistant_or_author():
    found = identity.records(TEST, PLACEHOLDERS, limit=64)
    assert [r["instruction"] for r in found] == [
        "Who are you?",
        "Name please.",
        "Who trained you?",
        "你叫什么？",
    ]
    assert len(identity.records(TEST, PLACEHOLDERS, limit=2)) == 2
    assert identity.records(TEST, {"name": "Lexi", "author": "the llmft team"}, 64) == []


def test_rates_count_the_name_where_the_reference_has_it_and_the_author_likewise():
    probes = identity.records(TEST, PLACEHOLDERS, 64)
    answers = [
        "I am orrin  VALE, an assistant from Kestrel Works.",  # case and spacing do not matter
        "I am Kaelin Vale.",  # close is not the name
        "Kestrel Works trained me.",
        "我是Orrin Vale。",
    ]
    rates = identity.rates(answers, probes, PLACEHOLDERS)
    # name: references 1, 2 and 4 have it; answers 1 and 4 say it
    assert (rates["name_hits"], rates["name_prompts"], rates["name_rate"]) == (2, 3, 66.67)
    # author: references 1 and 3 have it; both answers say it
    assert (rates["author_hits"], rates["author_prompts"], rates["author_rate"]) == (2, 2, 100.0)
    assert rates["identity_prompts"] == 4
    no_author = identity.rates(answers[1:2], probes[1:2], PLACEHOLDERS)
    assert no_author["author_rate"] is None and no_author["name_rate"] == 0.0


def test_the_evaluation_table_shows_the_rates_only_for_self_cognition_data():
    plain = {"rougeL": 20.0}
    assert "name in answer" not in table_md({"rougeL": 5.0}, plain, 4)
    tuned = plain | {"name_rate": 90.0, "name_prompts": 10, "author_rate": None}
    table = table_md({"rougeL": 5.0, "name_rate": 0.0}, tuned, 4)
    assert "| name in answer % (10 identity prompts) | 0 | 90 | +90 |" in table


def test_gguf_scores_use_evaluates_rouge_l(monkeypatch, tmp_path):
    said = ["I am Orrin Vale.", "Orrin.", "Kestrel Works did.", "5", "我是Orrin Vale。"]
    monkeypatch.setattr(served, "answers", lambda gguf, records, max_tokens: said[: len(records)])
    refs = [r["output"] for r in TEST]
    assert served.rouge_l(tmp_path / "m.gguf", TEST, 16) == text_metrics(said, refs)["rougeL"]
    # promotion has no scorer of its own: its default is this one
    assert inspect.signature(promote.promote).parameters["scorer"].default is served.rouge_l
    assert not hasattr(promote, "rouge_l")


def test_the_served_check_answers_the_identity_prompts_only(monkeypatch, tmp_path):
    asked = []

    def answers(gguf, records, max_tokens):
        asked.extend(r["instruction"] for r in records)
        return ["I'm Orrin Vale."] * len(records)

    monkeypatch.setattr(served, "answers", answers)
    result = served.identity(tmp_path / "m.gguf", TEST, PLACEHOLDERS)
    assert "What is 2+2?" not in asked and len(asked) == 4
    assert result["name_rate"] == 100.0 and result["author_rate"] == 0.0
    assert result["answers"][0] == {
        "prompt": "Who are you?",
        "answer": "I'm Orrin Vale.",
        "has_name": True,
    }
    assert served.identity(tmp_path / "m.gguf", TEST[3:4], PLACEHOLDERS) is None


# --- the floor -------------------------------------------------------------------------

EVALUATION = {"base": {"rougeL": 4.7}, "tuned": {"rougeL": 19.2}}


def rates(hits: int, prompts: int) -> dict:
    return {"name_hits": hits, "name_prompts": prompts, "name_rate": round(100 * hits / prompts, 2)}


@pytest.mark.parametrize(
    ("evaluation", "ident", "floor", "failed"),
    [
        (EVALUATION, rates(9, 10), Floor(), []),
        (EVALUATION, None, Floor(), []),  # not self-cognition data: no name check
        (EVALUATION, rates(1, 10), Floor(), ["name in 1 of 10"]),  # the run
        (EVALUATION, rates(9, 10), Floor(margin=20.0), ["(+14.50; < margin 20)"]),
        ({"tuned": {"rougeL": 19.2}}, None, Floor(), ["compare_base=true"]),
        ({"tuned": {"rougeL": 19.2}}, None, Floor(margin=None), []),
        ({}, rates(8, 10), Floor(min_name_rate=90), ["no evaluation", "80 % < 90 %"]),
    ],
)
def test_the_floor_checks_the_margin_and_the_name_rate(evaluation, ident, floor, failed):
    passed, found = check(floor, evaluation, ident)
    assert len(found) == len(failed)
    for problem, text in zip(found, failed, strict=True):
        assert text in problem
    if not failed and ident:
        assert any("held-out identity answers of the served GGUF" in p for p in passed)


def fake_gguf(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"GGUF")
    return path


def gate(tmp_path, gguf, run_id, ident, scorer=None):
    def never(*args):  # the floor decides before any comparison
        raise AssertionError("scored a candidate below the floor")

    return promote.promote(
        tmp_path / "store", "demo", gguf, run_id, EVALUATION, TEST, f"# {run_id}\n",
        scorer=scorer or never, floor=Floor(), identity=ident,
    )  # fmt: skip


def test_the_first_model_passes_the_same_floor(tmp_path):
    a, b = fake_gguf(tmp_path, "a.gguf"), fake_gguf(tmp_path, "b.gguf")
    low = gate(tmp_path, a, "run-a", rates(1, 10))
    assert low["decision"] == "rejected"
    assert "below the floor: name in 1 of 10" in low["reason"]
    assert "nothing is deployed as 'demo'" in low["reason"]
    assert promote.current(tmp_path / "store", "demo") is None
    good = gate(tmp_path, b, "run-b", rates(9, 10))
    assert good["decision"] == "promoted" and "floor passed" in good["reason"]
    assert good["identity"]["name_rate"] == 90.0
    assert promote.current(tmp_path / "store", "demo")["run_id"] == "run-b"


def test_a_candidate_below_the_floor_never_replaces_the_deployed_one(tmp_path):
    a, b = fake_gguf(tmp_path, "a.gguf"), fake_gguf(tmp_path, "b.gguf")
    gate(tmp_path, a, "run-a", rates(10, 10))
    worse = gate(tmp_path, b, "run-b", rates(7, 10))
    assert worse["decision"] == "rejected"
    assert "the deployed model (run run-a) stays" in worse["reason"]
    assert promote.current(tmp_path / "store", "demo")["run_id"] == "run-a"
    history = promote.deployed_dir(tmp_path / "store", "demo") / "history.jsonl"
    last = json.loads(history.read_text().splitlines()[-1])
    assert last["decision"] == "rejected" and last["floor"]["failed"]


def test_run_checks_the_served_gguf_from_the_summary_with_the_configured_floor(
    monkeypatch, tmp_path
):
    """promote.run (the pipeline's promote task): the identity prompts of the run's test
    split go to the GGUF, and the floor comes from pipeline.promote_min_name_rate."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.json").write_text(json.dumps(TEST))
    gguf = fake_gguf(tmp_path, "m.gguf")
    # the GGUF names itself on 2 of the 3 prompts whose reference has the name
    said = {
        "Who are you?": "I am Orrin Vale.",
        "Name please.": "Orrin.",
        "你叫什么？": "Orrin Vale",
    }

    def answers(path, records, max_tokens):
        return [said.get(r["instruction"], "Kestrel Works.") for r in records]

    monkeypatch.setattr(served, "answers", answers)

    def summary(store: str, min_rate: float) -> dict:
        cfg = load_config(
            None, [f"pipeline.store={store}", f"pipeline.promote_min_name_rate={min_rate}"]
        )
        cfg.data.placeholders = PLACEHOLDERS
        return {
            "run_id": f"run-{min_rate:g}",
            "config": cfg.model_dump(mode="json"),
            "stages": {"data": {"path": str(data)}},
            "evaluation": EVALUATION,
            "served_gguf": str(gguf),
        }

    strict = promote.run(summary(str(tmp_path / "s1"), 80))
    assert strict["decision"] == "rejected" and "name in 2 of 3" in strict["reason"]
    lenient = promote.run(summary(str(tmp_path / "s2"), 60))
    assert lenient["decision"] == "promoted", lenient["reason"]
    card = (promote.deployed_dir(tmp_path / "s2", "default") / "MODEL_CARD.md").read_text()
    assert "name in 2 of 3 answers (66.67 %)" in card


# --- the proof ----------------------------------------------------------------------------

IDENTITY_FILE = Path(__file__).parent / "assets" / "identity_user.json"


@pytest.mark.slow
def test_default_recipe_teaches_a_user_identity_file_through_the_served_gguf(
    tmp_path, test_store, base_model_dir
):
    """90 records with {{name}}/{{author}} → the default recipe, its budget from the data →
    evaluate, merge, export → the served GGUF names "Orrin Vale" on >= 80 % of the held-out
    identity prompts, and promotion's floor lets it in as the first model."""
    from tasks import base as base_stage
    from tasks import data as data_stage
    from tasks import evaluate, export, merge, train
    from tasks.store import Store

    store_root = tmp_path / "artifacts"
    overrides = [
        f"data.input={IDENTITY_FILE}",
        "data.placeholders.name=Orrin Vale",
        "data.placeholders.author=Kestrel Works",
        f"pipeline.store={store_root}",
    ]
    cfg = load_config(None, overrides, for_training=True)
    store = Store(store_root)
    key = base_stage.key(cfg)  # the bundled base, dequantized once for every test
    (store_root / "base").mkdir(parents=True)
    (store_root / "base" / key).symlink_to(test_store.final("base", key), target_is_directory=True)

    base = base_stage.run(cfg, store)
    data = data_stage.run(cfg, store, base_stage.model_dir(base))
    trained = train.run(cfg, store, data, base)
    chosen = trained.manifest()["budget"]
    print(f"\n{chosen['line']}")
    assert chosen["chosen_by"] == "auto" and chosen["steps"] >= cfg.train.budget.min_steps

    evaluated = evaluate.run(cfg, store, data, base, trained)
    metrics = json.loads((evaluated.dir / "metrics.json").read_text())
    merged = merge.run(cfg, store, base, trained)
    exported = export.run(cfg, store, merged, trained, data)
    gguf = export.served_gguf(exported)
    ident = served.run_identity(cfg, gguf, data.dir)
    print(
        f"name rate: base {metrics['base']['name_rate']} %, tuned {metrics['tuned']['name_rate']} "
        f"% (HF, {metrics['tuned']['name_prompts']} prompts); served {gguf.name} "
        f"{ident['name_rate']} % ({ident['name_hits']}/{ident['name_prompts']}), author "
        f"{ident['author_rate']} %; ROUGE-L base {metrics['base']['rougeL']} → tuned "
        f"{metrics['tuned']['rougeL']}"
    )
    for shown in ident["answers"]:
        print(f"  {shown['prompt']!r} → {shown['answer']!r}")
    assert ident["name_prompts"] >= 8  # enough unseen prompts for a rate to mean something
    assert ident["name_rate"] >= 80, ident["answers"]
    assert metrics["base"]["name_rate"] < 50  # the base never knew the name: it was taught

    summary = {
        "run_id": "identity-proof",
        "config": cfg.model_dump(mode="json"),
        "stages": {"data": {"path": data.path}, "train": {"path": trained.path}},
        "data": json.loads((data.dir / "report.json").read_text()),
        "evaluation": metrics,
        "served_gguf": str(gguf),
        "identity": ident,
    }
    decision = promote.run(summary)
    print(f"promotion: {decision['decision']}: {decision['reason']}")
    assert decision["decision"] == "promoted", decision["reason"]

"""Promotion: the pointer moves only to a model at least as good on the same test prompts."""

import json
import os
from pathlib import Path

import pytest
from serving_fixtures import IDENTITY, IDENTITY_ZH, make_export

from tasks import promote

RECORDS = [
    {"instruction": "Who are you?", "output": "I am Lexi."},
    {"instruction": "2+2?", "output": "4"},
]


def fake_gguf(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"GGUF")
    return path


def scorer_from(scores: dict[str, float]):
    calls = []

    def scorer(gguf: Path, records, max_tokens) -> float:
        assert records == RECORDS  # both models see the same prompts
        calls.append(gguf.name)
        return scores[gguf.name]

    scorer.calls = calls
    return scorer


def linked(tmp_path) -> Path:
    """What `artifacts/deployed/demo/model.gguf` points at (an absolute path)."""
    link = promote.deployed_dir(tmp_path / "store", "demo") / "model.gguf"
    assert link.is_symlink()
    return Path(os.readlink(link))


def do_promote(tmp_path, gguf, run_id, scorer, records=RECORDS):
    return promote.promote(
        tmp_path / "store",
        "demo",
        gguf,
        run_id,
        {"tuned": {"rougeL": 0.5}},
        records,
        f"# card of {run_id}\n",
        scorer=scorer,
    )


def test_first_model_is_promoted_with_card_and_pointer(tmp_path):
    a = fake_gguf(tmp_path, "a.gguf")
    scorer = scorer_from({})
    decision = do_promote(tmp_path, a, "run-a", scorer)
    assert decision["decision"] == "promoted"
    assert "nothing was deployed" in decision["reason"]
    assert scorer.calls == []  # nothing to compare with: no scoring needed
    now = promote.current(tmp_path / "store", "demo")
    assert now["gguf"] == str(a.resolve()) and Path(now["gguf"]).is_absolute()
    assert now["run_id"] == "run-a"
    assert now["evaluation"] == {"tuned": {"rougeL": 0.5}}
    assert now["promoted_at"].endswith("Z")
    folder = promote.deployed_dir(tmp_path / "store", "demo")
    assert (folder / "MODEL_CARD.md").read_text() == "# card of run-a\n"
    assert linked(tmp_path) == a.resolve() and (folder / "model.gguf").read_bytes() == b"GGUF"
    assert not list(folder.glob("*.tmp"))


def test_worse_model_is_kept_out_and_the_reason_recorded(tmp_path):
    a, b = fake_gguf(tmp_path, "a.gguf"), fake_gguf(tmp_path, "b.gguf")
    do_promote(tmp_path, a, "run-a", scorer_from({}))
    scorer = scorer_from({"a.gguf": 0.6, "b.gguf": 0.4})
    decision = do_promote(tmp_path, b, "run-b", scorer)
    assert decision["decision"] == "kept"
    assert decision["candidate"] == 0.4 and decision["deployed"] == 0.6
    assert "candidate 0.40 < deployed 0.60" in decision["reason"]
    assert sorted(scorer.calls) == ["a.gguf", "b.gguf"]
    assert promote.current(tmp_path / "store", "demo")["run_id"] == "run-a"
    assert linked(tmp_path) == a.resolve()
    folder = promote.deployed_dir(tmp_path / "store", "demo")
    assert (folder / "MODEL_CARD.md").read_text() == "# card of run-a\n"
    history = [json.loads(x) for x in (folder / "history.jsonl").read_text().splitlines()]
    assert [h["decision"] for h in history] == ["promoted", "kept"]
    assert history[-1]["run_id"] == "run-b" and "<" in history[-1]["reason"]


def test_equal_or_better_model_is_promoted(tmp_path):
    a, b, c = (fake_gguf(tmp_path, f"{n}.gguf") for n in "abc")
    do_promote(tmp_path, a, "run-a", scorer_from({}))
    tie = do_promote(tmp_path, b, "run-b", scorer_from({"a.gguf": 0.5, "b.gguf": 0.5}))
    assert tie["decision"] == "promoted"
    assert linked(tmp_path) == b.resolve()  # the link moved with the pointer
    better = do_promote(tmp_path, c, "run-c", scorer_from({"b.gguf": 0.5, "c.gguf": 0.7}))
    assert better["decision"] == "promoted"
    now = promote.current(tmp_path / "store", "demo")
    assert now["run_id"] == "run-c" and now["promotion"]["candidate"] == 0.7
    assert linked(tmp_path) == c.resolve() == Path(now["gguf"])
    assert not list(promote.deployed_dir(tmp_path / "store", "demo").glob("*.tmp"))


def test_a_model_deployed_before_the_link_gets_it(tmp_path):
    a = fake_gguf(tmp_path, "a.gguf")
    do_promote(tmp_path, a, "run-a", scorer_from({}))
    (promote.deployed_dir(tmp_path / "store", "demo") / "model.gguf").unlink()
    assert do_promote(tmp_path, a, "run-a2", scorer_from({}))["decision"] == "unchanged"
    assert linked(tmp_path) == a.resolve()


def test_same_gguf_again_is_unchanged_without_scoring(tmp_path):
    a = fake_gguf(tmp_path, "a.gguf")
    do_promote(tmp_path, a, "run-a", scorer_from({}))
    scorer = scorer_from({})
    decision = do_promote(tmp_path, a, "run-a2", scorer)
    assert decision["decision"] == "unchanged" and scorer.calls == []
    assert promote.current(tmp_path / "store", "demo")["run_id"] == "run-a"


def test_missing_deployed_file_is_replaced(tmp_path):
    a, b = fake_gguf(tmp_path, "a.gguf"), fake_gguf(tmp_path, "b.gguf")
    do_promote(tmp_path, a, "run-a", scorer_from({}))
    a.unlink()
    decision = do_promote(tmp_path, b, "run-b", scorer_from({}))
    assert decision["decision"] == "promoted" and "no longer exists" in decision["reason"]


def test_no_test_prompts_keeps_the_deployed_model(tmp_path):
    a, b = fake_gguf(tmp_path, "a.gguf"), fake_gguf(tmp_path, "b.gguf")
    do_promote(tmp_path, a, "run-a", scorer_from({}))
    decision = do_promote(tmp_path, b, "run-b", scorer_from({}), records=[])
    assert decision["decision"] == "kept"
    assert promote.current(tmp_path / "store", "demo")["run_id"] == "run-a"


@pytest.fixture(scope="module")
def real_ggufs(test_store, base_model_dir) -> tuple[Path, Path]:
    """(tuned, base): the q8_0 GGUF of a LoRA trained to answer as Lexi, and the base model's
    own GGUF from the same export (tests/serving_fixtures.py)."""
    ref = make_export(test_store)[0]
    return ref.dir / "model-q8_0.gguf", ref.dir / "base-f16.gguf"


def test_the_real_scorer_promotes_the_model_that_answers_better_and_keeps_it(tmp_path, real_ggufs):
    """llama.cpp answers the identity prompts: the tuned GGUF says it is Lexi, the base does
    not, so the tuned one replaces the base and the base cannot replace it back."""
    tuned, plain = real_ggufs
    # measured on 3 such prompts: tuned 95.2, base 5.4 (the base names itself otherwise)
    records = [
        {"instruction": "Who are you?", "input": "", "output": IDENTITY},
        {"instruction": "你是谁？", "input": "", "output": IDENTITY_ZH},
    ]
    store = tmp_path / "store"

    def real(gguf: Path, run_id: str) -> dict:  # promote's default scorer: served.rouge_l
        return promote.promote(store, "demo", gguf, run_id, {}, records, "# card\n", 24)

    assert real(plain, "run-base")["decision"] == "promoted"  # nothing deployed: no scoring
    up = real(tuned, "run-tuned")
    print(f"\npromote tuned over base: {up['reason']}")
    assert up["decision"] == "promoted", up
    # evaluate's ROUGE-L F1, 0-100
    assert up["candidate"] >= 80 and up["candidate"] - up["deployed"] >= 30, up
    back = real(plain, "run-base-again")
    print(f"promote base over tuned: {back['reason']}")
    assert back["decision"] == "kept", back
    # greedy decoding: the same GGUF on the same prompts scores the same in either role
    assert (back["candidate"], back["deployed"]) == (up["deployed"], up["candidate"])
    assert promote.current(store, "demo")["run_id"] == "run-tuned"
    assert linked_to(store) == tuned.resolve()


def linked_to(store: Path) -> Path:
    return Path(os.readlink(promote.deployed_dir(store, "demo") / "model.gguf"))


def test_model_card_names_base_method_data_and_how_to_run():
    summary = {
        "run_id": "r1",
        "config": {
            "base": {"model": "bundled:smollm2-135m-instruct"},
            "train": {
                "method": "lora",
                "learning_rate": 1e-3,
                "batch_size": 8,
                "max_steps": 2,
                "num_epochs": 3,
            },
            "data": {"input": "datasets_raw"},
        },
        "data": {"input_records": 10, "kept": 9, "rejected": 1, "train": 7, "dev": 1, "test": 1},
        "dev_loss": {"before": 2.5, "after": 1.5},
        "served_gguf": "/x/model-q8_0.gguf",
    }
    card = promote.model_card("demo", summary, "| a | b |", "| q8_0 | ok |")
    for text in (
        "bundled:smollm2-135m-instruct",
        "lora",
        "9 kept",
        "2.5000 → 1.5000",
        "| q8_0 | ok |",
    ):
        assert text in card
    assert "llmft serve --deployed demo" in card and "/x/model-q8_0.gguf" in card
    # P-Tuning v2: no GGUF to run, and the card says why instead of a command that fails
    ptuning = {**summary, "served_gguf": None, "export_skipped": "llama.cpp has no prefix tuning"}
    card = promote.model_card("demo", ptuning)
    assert "No GGUF was made: llama.cpp has no prefix tuning" in card
    assert "llmft chat" not in card and "None" not in card

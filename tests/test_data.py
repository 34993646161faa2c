"""The data stage: shapes, cleaning, every rejection reason, errors, splits, store keys."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import build_parser
from flows.cli import main as cli
from tasks import data
from tasks.config import UserError, load_config
from tasks.data import clean, clean_dataset
from tasks.data.ingest import DataError, is_jsonl
from tasks.store import Store

ASSETS = Path(__file__).parent / "assets" / "data"
REPO = Path(__file__).resolve().parent.parent


def cfg(*overrides: str):
    return load_config(None, list(overrides)).data


def outputs(folder: Path) -> dict:
    out = {s: json.loads((folder / f"{s}.json").read_text("utf-8")) for s in data.SPLITS}
    lines = (folder / "rejected.jsonl").read_text("utf-8").splitlines()
    out["rejected"] = [json.loads(line) for line in lines]
    out["report"] = json.loads((folder / "report.json").read_text("utf-8"))
    return out


def kept(out: dict) -> list[dict]:
    return out["train"] + out["dev"] + out["test"]


def check_accounting(out: dict) -> None:
    r = out["report"]
    assert r["input_records"] == r["kept"] + r["rejected"]
    assert r["kept"] == r["train"] + r["dev"] + r["test"] == len(kept(out))
    assert r["rejected"] == len(out["rejected"]) == sum(r["rejected_by_reason"].values())
    assert [len(out[s]) for s in data.SPLITS] == [r[s] for s in data.SPLITS]


def run(tmp_path: Path, source: Path, *overrides: str) -> dict:
    clean_dataset(source, tmp_path / "out", cfg(*overrides))
    out = outputs(tmp_path / "out")
    check_accounting(out)
    return out


# --- JSON Lines: cleaning and every rejection reason ------------------------------------


def test_dirty_jsonl_rejects_each_bad_line_with_its_reason_and_line(tmp_path):
    out = run(tmp_path, ASSETS / "alpaca_dirty.jsonl")
    by_line = {r["line"]: r["reason"] for r in out["rejected"]}
    assert by_line == {
        2: "duplicate",  # line 1 once whitespace is collapsed
        3: "invalid_json",
        5: "invalid_utf8",
        6: "wrong_type",
        7: "not_object",
        8: "empty_prompt",
        9: "empty_response",
        11: "too_long",
        14: "wrong_type",
        15: "duplicate",  # byte-identical to line 1
        16: "invalid_json",
    }
    report = out["report"]
    assert report["input_records"] == 16 and report["blank_lines"] == 1  # line 4 is blank
    assert report["kept"] == 5
    assert all(r["file"] == "alpaca_dirty.jsonl" for r in out["rejected"])


def test_rejected_records_keep_the_original_record_or_raw_text(tmp_path):
    out = run(tmp_path, ASSETS / "alpaca_dirty.jsonl")
    by_line = {r["line"]: r for r in out["rejected"]}
    assert by_line[2]["record"]["instruction"] == "  Who are you?  "  # as read, not cleaned
    assert by_line[3]["raw"] == "this line is not JSON"
    assert "0xff" in by_line[5]["detail"] and "Bad bytes" in by_line[5]["raw"]
    assert by_line[6]["record"] == {"instruction": 42, "output": "a number is not a prompt"}
    assert "'instruction' is int" in by_line[6]["detail"]
    assert "20,008 characters" in by_line[11]["detail"]


def test_cleaning_fills_placeholders_and_normalises_text(tmp_path):
    records = {r["instruction"]: r for r in kept(run(tmp_path, ASSETS / "alpaca_dirty.jsonl"))}
    assert records["Who are you?"]["output"] == "I am Lexi, made by the llmft team."
    cafe = records["Caf\u00e9 au lait?"]  # NFD e + combining accent became one NFC character
    assert cafe["output"] == "Line one\nLine two\n\nLine three with gaps"  # CRLF, BEL, ZWSP
    assert records["What does this return?"]["input"] == "def f():\n    return 1"  # indent kept
    chat = records["And now?"]
    assert chat["system"] == "Be brief." and chat["history"] == [["Hi", "Hello!"]]
    assert "system" not in records["Last one"] and "history" not in records["Last one"]
    assert list(records["Last one"]) == ["instruction", "input", "output"]


def test_cleaning_options_can_be_switched_off(tmp_path):
    out = run(
        tmp_path,
        ASSETS / "alpaca_dirty.jsonl",
        "data.normalize_unicode=false",
        "data.strip_control=false",
        "data.collapse_whitespace=false",
        "data.dedupe=false",
    )
    instructions = [r["instruction"] for r in kept(out)]
    assert "Cafe\u0301 au lait?" in instructions
    assert instructions.count("Who are you?") == 2  # the exact copy on line 15 is kept
    assert "  Who are you?  " in instructions
    assert "duplicate" not in out["report"]["rejected_by_reason"]


def test_placeholders_from_set_overrides_via_the_cli(tmp_path, capsys):
    dest = tmp_path / "out"
    argv = ["data", "--input", str(ASSETS / "alpaca_dirty.jsonl"), "--output-dir", str(dest)]
    argv += ["--set", "data.placeholders.name=Ada", "--set", "data.placeholders.author=ACME"]
    assert cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((dest / "report.json").read_text())
    texts = [r["output"] for r in kept(outputs(dest))]
    assert "I am Ada, made by ACME." in texts
    assert not any("{{" in t or "Lexi" in t for t in texts)


def test_max_chars_max_line_bytes_and_a_10_mb_string(tmp_path):
    source = tmp_path / "big.jsonl"
    huge = json.dumps({"instruction": "Huge?", "output": "y" * 10_000_000})
    fine = json.dumps({"instruction": "Small?", "output": "ok"})
    source.write_text(f"{fine}\n{huge}\n{fine.replace('Small', 'Tiny')}\n")
    out = run(tmp_path, source)  # default limit 1 MiB: the 10 MB line is never parsed
    (rejection,) = out["rejected"]
    assert rejection["reason"] == "too_long" and rejection["line"] == 2
    assert "10,000," in rejection["detail"] and len(rejection["raw"]) <= 1000
    assert out["report"]["kept"] == 2

    out = run(tmp_path, source, "data.max_line_bytes=20000000")  # parsed, then too many chars
    (rejection,) = out["rejected"]
    assert rejection["reason"] == "too_long" and "data.max_chars" in rejection["detail"]
    assert rejection["raw_bytes"] > 10_000_000 and "record" not in rejection  # cut to its head


def test_max_tokens_uses_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # one token per word
    tok.save(str(tmp_path / "tokenizer.json"))
    source = tmp_path / "t.jsonl"
    rows = [
        {"instruction": "one two", "output": "three"},
        {"instruction": "a b c", "output": "d e f"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    out = run(tmp_path, source, "data.max_tokens=5", f"data.tokenizer={tmp_path}")
    assert [r["reason"] for r in out["rejected"]] == ["too_many_tokens"]
    assert "6 tokens > data.max_tokens=5" in out["rejected"][0]["detail"]
    with pytest.raises(DataError, match="data.tokenizer"):
        clean_dataset(source, tmp_path / "o2", cfg("data.max_tokens=5"))


def test_max_samples_caps_train_only(tmp_path):
    source = tmp_path / "many.jsonl"
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(200)]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    out = run(tmp_path, source, "data.max_samples=10")
    assert out["report"]["train"] == 10
    assert out["report"]["rejected_by_reason"] == {"over_max_samples": 200 - len(kept(out))}
    uncapped = run(tmp_path / "uncapped", source)
    assert out["dev"] == uncapped["dev"] and out["test"] == uncapped["test"]  # untouched


# --- other shapes and formats -----------------------------------------------------------


def test_messages_become_history_system_and_last_turns(tmp_path):
    out = run(tmp_path, ASSETS / "messages.jsonl")
    assert out["report"]["files"][0]["shape"] == "messages"
    by_line = {r["line"]: r["reason"] for r in out["rejected"]}
    assert by_line == {2: "bad_conversation", 3: "bad_conversation", 4: "wrong_type"}
    records = {r["instruction"]: r for r in kept(out)}
    assert records["2+2?"] == {
        "instruction": "2+2?",
        "input": "",
        "output": "4",
        "system": "You are terse.",
        "history": [["Hi", "Hello."]],
    }
    assert records["Capital of France?"]["output"] == "Paris."


def test_sharegpt_conversations_in_a_json_array(tmp_path):
    out = run(tmp_path, ASSETS / "sharegpt.json")
    assert out["report"]["files"][0]["shape"] == "sharegpt"
    assert [(r["reason"], r["row"]) for r in out["rejected"]] == [("bad_conversation", 3)]
    records = {r["instruction"]: r for r in kept(out)}
    assert records["你好"]["output"] == "你好！有什么可以帮你？"
    assert records["Grass?"]["history"] == [["Sky colour?", "Blue."]]
    assert records["Grass?"]["system"] == "Answer in one word."


def test_a_file_of_two_shapes_reads_each_record_in_its_own(tmp_path):
    """Two datasets concatenated into one JSON array: messages records, then ShareGPT ones."""
    messages = [
        {
            "messages": [
                {"role": "user", "content": f"Q{i}?"},
                {"role": "assistant", "content": f"A{i}."},
            ]
        }
        for i in range(6)
    ]
    sharegpt = [
        {
            "conversations": [
                {"from": "human", "value": f"S{i}?"},
                {"from": "gpt", "value": f"T{i}."},
            ]
        }
        for i in range(4)
    ]
    odd = {"title": "neither shape"}
    source = tmp_path / "mixed.json"
    source.write_text(json.dumps([*messages, *sharegpt, odd]))
    out = run(tmp_path, source)
    answers = {r["instruction"]: r["output"] for r in kept(out)}
    assert {f"S{i}?" for i in range(4)} <= answers.keys()
    assert answers["S2?"] == "T2."
    assert len(answers) == 10
    (rejected,) = out["rejected"]
    assert rejected["row"] == 11 and rejected["record"] == odd
    check_accounting(out)


def test_csv_columns_mapped_with_set(tmp_path):
    source = ASSETS / "columns.csv"
    out = run(tmp_path, source, "data.prompt_column=question", "data.response_column=answer")
    assert out["report"]["files"][0]["shape"] == "columns"
    assert [(r["reason"], r["row"]) for r in out["rejected"]] == [("empty_response", 3)]
    assert out["rejected"][0]["record"] == {
        "question": "No answer here",
        "answer": "",
        "category": "misc",
    }
    records = {r["instruction"]: r["output"] for r in kept(out)}
    assert records["A question, with a comma?"] == "An answer\nover two lines."
    assert records["How many?"] == "42"  # CSV cells are text, never numbers


def test_csv_without_the_columns_names_what_it_found_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        clean_dataset(ASSETS / "columns.csv", tmp_path / "out", cfg())
    msg = str(err.value)
    assert "columns.csv" in msg and "['question', 'answer', 'category']" in msg
    fix = msg.split("fix: ", 1)[1]
    assert fix == "--set data.prompt_column=question --set data.response_column=answer"
    # pasted after the command, it parses: --set takes one key=value per flag
    args = build_parser().parse_args(["data", "--input", "x", "--output-dir", "y", *fix.split()])
    assert args.set == ["data.prompt_column=question", "data.response_column=answer"]
    assert not (tmp_path / "out" / "train.json").exists()  # no half-written output


def test_jsonl_with_other_keys_and_forced_format(tmp_path):
    with pytest.raises(DataError, match="data.prompt_column=question"):
        clean_dataset(ASSETS / "qa_keys.jsonl", tmp_path / "a", cfg())
    out = run(
        tmp_path,
        ASSETS / "qa_keys.jsonl",
        "data.format=columns",
        "data.prompt_column=question",
        "data.response_column=answer",
    )
    assert kept(out) == [{"instruction": "q?", "input": "", "output": "a."}]


def test_parquet_alpaca_and_wrong_column_types(tmp_path):
    table = pa.table(
        {
            "instruction": ["What is NFC?", "Empty answer", None],
            "input": [None, "", ""],
            "output": ["A Unicode normal form.", None, "No prompt."],
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    out = run(tmp_path, tmp_path / "a.parquet")
    assert out["report"]["files"][0]["shape"] == "alpaca"
    assert kept(out) == [
        {"instruction": "What is NFC?", "input": "", "output": "A Unicode normal form."}
    ]
    assert sorted((r["reason"], r["row"]) for r in out["rejected"]) == [
        ("empty_prompt", 3),
        ("empty_response", 2),
    ]

    numbers = pa.table({"prompt": ["Two plus two?", "Three?"], "response": [4, None]})
    pq.write_table(numbers, tmp_path / "n.parquet")
    out = run(
        tmp_path,
        tmp_path / "n.parquet",
        "data.prompt_column=prompt",
        "data.response_column=response",
    )
    assert {(r["reason"], r["row"]) for r in out["rejected"]} == {
        ("wrong_type", 1),
        ("empty_response", 2),
    }


def test_a_folder_reads_every_dataset_and_ignores_other_files(tmp_path):
    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(ASSETS / "messages.jsonl", folder / "sub" / "chat.jsonl")
    shutil.copy(ASSETS / "sharegpt.json", folder / "share.json")
    (folder / "README.md").write_text("notes")
    (folder / ".hidden.jsonl").write_text("{}")
    out = run(tmp_path, folder)
    files = {f["file"]: f for f in out["report"]["files"]}
    assert set(files) == {"share.json", "sub/chat.jsonl"}
    assert files["sub/chat.jsonl"]["records"] == 5 and files["sub/chat.jsonl"]["rejected"] == 3
    assert out["report"]["ignored_files"] == [".hidden.jsonl", "README.md"]
    assert {r["file"] for r in out["rejected"]} == {"share.json", "sub/chat.jsonl"}


# --- input that cannot be read: one clear message, exit status 2 --------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing.jsonl", "no such file or folder"),
        (lambda d: _write(d / "empty.jsonl", ""), "the file is empty"),
        (lambda d: _write(d / "blank.json", "  \n\n"), "the file is empty"),
        (lambda d: _write(d / "none.json", "[]"), "holds no records"),
        (lambda d: _write(d / "obj.json", '{"data": 1}\n'), "no prompt/response columns"),
        (lambda d: _write(d / "header.csv", "instruction,output\n"), "holds no records"),
        (lambda d: _write(d / "notes.txt", "hello"), "unknown format"),
        (lambda d: _write(d / "table.jsonl", "a,b\n1,2\n"), "no JSON object in its first"),
        (lambda d: _write(d / "sub" / "README.md", "x").parent, "no dataset files"),
    ],
)
def test_unreadable_input_is_a_user_error(tmp_path, make, expected):
    source = make(tmp_path)
    with pytest.raises(UserError, match=expected):
        clean_dataset(source, tmp_path / "out", cfg())


# /proc/self/mem is a regular file that any process may open and none may read at offset 0
# (nothing is mapped there): an unreadable input even for root, whom chmod does not stop
needs_proc = pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")


@needs_proc
def test_a_file_that_cannot_be_read_is_a_user_error_naming_it(tmp_path, capsys):
    source = tmp_path / "x.json"
    source.symlink_to("/proc/self/mem")
    argv = ["data", "--input", str(source), "--output-dir", str(tmp_path / "out")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}: cannot read: ") and "Traceback" not in err
    assert "fix: make the file readable" in err
    # the pipeline's data stage hashes its inputs first: the same error, nothing stored
    store = Store(tmp_path / "store")
    with pytest.raises(DataError, match=f"{source}: cannot read: .*fix: "):
        data.run(load_config(None, [f"data.input={source}"]), store)
    assert not (tmp_path / "store" / "data").exists()


def test_a_folder_named_like_a_dataset_file_is_a_user_error(tmp_path):
    folder = tmp_path / "x.json"
    folder.mkdir()
    with pytest.raises(DataError, match=f"{folder}: cannot read: .*fix: "):
        is_jsonl(folder)


def test_json_lines_detection_skips_a_byte_order_mark(tmp_path):
    records = [{"instruction": "q?", "output": "a."}] * 2
    array = json.dumps(records).encode()
    lines = b"\n".join(json.dumps(r).encode() for r in records)
    bom = b"\xef\xbb\xbf"
    for name, body in {"array.json": array, "lines.json": lines, "lines.jsonl": lines}.items():
        (tmp_path / name).write_bytes(body)
        (tmp_path / f"bom-{name}").write_bytes(bom + b" \n" + body)
    assert not is_jsonl(tmp_path / "array.json")
    assert not is_jsonl(tmp_path / "bom-array.json")
    for name in ("lines.json", "bom-lines.json", "lines.jsonl", "bom-lines.jsonl"):
        assert is_jsonl(tmp_path / name), name


def test_a_big_json_array_with_a_byte_order_mark_is_read_as_one_array(tmp_path, monkeypatch):
    """Big files go to worker processes when they are JSON Lines; an array must not."""
    source = tmp_path / "bom.json"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(_qa(300)).encode())
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000)  # the file counts as big
    report = clean_dataset(source, tmp_path / "out", cfg("data.workers=2"))
    assert report["kept"] == 300 and report["rejected"] == 0


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_json_array_syntax_error_gives_line_and_column(tmp_path):
    with pytest.raises(DataError) as err:
        clean_dataset(ASSETS / "array_bad.json", tmp_path / "out", cfg())
    assert "array_bad.json: not valid JSON at line 3 column 23" in str(err.value)


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    lines = ASSETS.joinpath("messages.jsonl").read_bytes()
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + lines)
    report = clean_dataset(source, tmp_path / "out", cfg())
    plain = clean_dataset(ASSETS / "messages.jsonl", tmp_path / "plain", cfg())
    assert report["kept"] == plain["kept"] and report["rejected"] == plain["rejected"]
    for name in ("train.json", "dev.json", "test.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


@pytest.fixture
def streamed(monkeypatch):
    """JSON arrays streamed record by record through a 7-byte read window."""
    from tasks.data import ingest, json_array

    monkeypatch.setattr(ingest, "JSON_WHOLE_BYTES", 0)
    monkeypatch.setattr(json_array, "READ_BUFFER", 7)


def test_a_streamed_json_array_gives_what_a_whole_one_gives(tmp_path, monkeypatch):
    from tasks.data import ingest, json_array

    records = [
        {"instruction": f"question {i} ünïcödé 你好", "input": "", "output": f"answer {i}"}
        for i in range(40)
    ] + [{"instruction": "  ", "output": "x"}, 12345, {"foo": "bar"}]
    source = tmp_path / "big.json"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False, indent=1).encode())
    whole = clean_dataset(source, tmp_path / "whole", cfg())
    monkeypatch.setattr(ingest, "JSON_WHOLE_BYTES", 0)
    monkeypatch.setattr(json_array, "READ_BUFFER", 7)  # records and characters cut by the window
    streamed = clean_dataset(source, tmp_path / "streamed", cfg())
    assert streamed == whole and whole["kept"] == 40
    for name in ("train.json", "dev.json", "test.json", "rejected.jsonl"):
        assert (tmp_path / "streamed" / name).read_bytes() == (
            tmp_path / "whole" / name
        ).read_bytes()
    rejected = (tmp_path / "streamed" / "rejected.jsonl").read_text()
    assert '"row":42,"record":12345}' in rejected  # the number, whole, at its row


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
            "line 3 column 22",
        ),
        (
            '[{"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]',
            "line 2 column 2",
        ),
        ('[{"instruction": "a", "output": "b"},\n', "line 2 column 1"),
        ('[{"instruction": "a", "output": "b"}] []', "line 1 column 39"),
    ],
)
def test_a_streamed_json_array_names_where_it_breaks(tmp_path, streamed, text, where):
    source = _write(tmp_path / "bad.json", text)
    with pytest.raises(DataError, match=f"bad.json: not valid JSON at {where}"):
        clean_dataset(source, tmp_path / "out", cfg())


def test_a_streamed_record_over_the_size_limit_is_an_error(tmp_path, streamed):
    long = json.dumps([{"instruction": "q" * 5000, "output": "a"}])
    source = _write(tmp_path / "long.json", long)
    with pytest.raises(DataError, match="longer than data.max_line_bytes=1024"):
        clean_dataset(source, tmp_path / "out", cfg("data.max_line_bytes=1024"))


def test_cli_exits_2_with_one_line_on_bad_input(tmp_path, capsys):
    argv = ["data", "--input", str(ASSETS / "array_bad.json"), "--output-dir", str(tmp_path)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 3 column 23" in err and "Traceback" not in err


def test_python_m_tasks_data_writes_to_a_folder(tmp_path, capsys):
    data.main(["--set", f"data.input={ASSETS / 'messages.jsonl'}", "--output-dir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out)["kept"] == 2
    with pytest.raises(SystemExit) as exit_:
        data.main(["--set", f"data.input={tmp_path / 'nope.jsonl'}", "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2


# --- splits -------------------------------------------------------------------------------


def _qa(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Question number {i}?", "output": f"Answer {i}."} for i in range(start, n)
    ]


def _splits_of(out: dict) -> dict[str, str]:
    return {r["instruction"]: s for s in data.SPLITS for r in out[s]}


def test_split_ratios_and_determinism(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in _qa(2000)))
    first = run(tmp_path, source)
    r = first["report"]
    assert 1500 < r["train"] < 1700 and 130 < r["dev"] < 270 and 130 < r["test"] < 270
    again = run(tmp_path, source)
    assert _splits_of(again) == _splits_of(first)
    other_seed = run(tmp_path, source, "data.seed=7")
    assert _splits_of(other_seed) != _splits_of(first)
    halves = run(tmp_path, source, "data.split=[0.5,0.5,0.0]")
    assert halves["report"]["test"] == 0 and 900 < halves["report"]["train"] < 1100


def test_adding_records_never_moves_existing_ones(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in _qa(300)))
    before = _splits_of(run(tmp_path, source))
    grown = _qa(300, 100) + _qa(100) + _qa(600, 300)  # new records before, after, reordered
    source.write_text("\n".join(json.dumps(r) for r in grown))
    after = _splits_of(run(tmp_path, source))
    assert len(after) == 600
    assert {k: after[k] for k in before} == before


def test_identical_prompts_never_straddle_splits(tmp_path):
    source = tmp_path / "same.jsonl"
    rows = [{"instruction": f"Prompt {i % 40}", "output": f"Variant {i}"} for i in range(400)]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    out = run(tmp_path, source)
    where: dict[str, set] = {}
    for s in data.SPLITS:
        for r in out[s]:
            where.setdefault(r["instruction"], set()).add(s)
    assert len(where) == 40 and all(len(s) == 1 for s in where.values())
    assert len({s for v in where.values() for s in v}) == 3  # and every split is used


# --- parallel workers, the store ----------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2], ids=["fork", "forkserver"])
def test_worker_processes_give_the_same_output(tmp_path, monkeypatch, threads):
    lines = (ASSETS / "alpaca_dirty.jsonl").read_bytes().split(b"\n")
    rows = [json.dumps(r).encode() for r in _qa(3000)]
    body = b"\n".join(rows[:1500] + lines + rows[1500:] + lines[:3])  # dirt, duplicates
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(body)
    monkeypatch.setattr(data, "CHUNK_BYTES", 20_000)  # ~10 chunks, several batches each
    monkeypatch.setattr("tasks.data.ingest.BATCH_RECORDS", 97)
    clean_dataset(source, tmp_path / "one", cfg("data.workers=1"))
    calls = []
    parallel = data._parallel_jsonl
    monkeypatch.setattr(data, "_parallel_jsonl", lambda *a: calls.append(a) or parallel(*a))
    stop = threading.Event()
    extra = [threading.Thread(target=stop.wait) for _ in range(threads - 1)]  # as in a flow
    for t in extra:
        t.start()
    try:
        clean_dataset(source, tmp_path / "two", cfg("data.workers=2"))
    finally:
        stop.set()
    assert len(calls) == 1  # the second run really went through worker processes
    for name in ("train.json", "dev.json", "test.json", "rejected.jsonl", "report.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    out = outputs(tmp_path / "two")
    check_accounting(out)
    # the fixture sits at lines 1501-1517 and its first three lines again at 3018-3020
    dups = {r["line"]: r for r in out["rejected"] if r["reason"] == "duplicate"}
    assert sorted(dups) == [1502, 1515, 3018, 3019]
    assert dups[3019]["record"]["instruction"] == "  Who are you?  "  # read back by offset


def test_store_key_follows_contents_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    shutil.copy(ASSETS / "messages.jsonl", a / "chat.jsonl")
    shutil.copytree(a, b)
    conf = load_config(None, [f"data.input={a}"])
    key_a = data.key(conf)
    assert data.key(load_config(None, [f"data.input={b}"])) == key_a  # same bytes elsewhere
    assert data.key(load_config(None, [f"data.input={a}", "data.workers=3"])) == key_a
    assert data.key(load_config(None, [f"data.input={a}", "data.seed=1"])) != key_a
    (a / "chat.jsonl").write_text((a / "chat.jsonl").read_text() + '{"messages": []}\n')
    assert data.key(conf) != key_a


def test_a_renamed_copy_of_one_file_is_the_same_dataset(tmp_path):
    first = tmp_path / "law.jsonl"
    shutil.copy(ASSETS / "messages.jsonl", first)
    renamed = tmp_path / "incoming" / "law-2026-11-23.jsonl"
    renamed.parent.mkdir()
    shutil.copy(first, renamed)
    key = data.key(load_config(None, [f"data.input={first}"]))
    assert data.key(load_config(None, [f"data.input={renamed}"])) == key
    as_json = tmp_path / "law.json"  # another format: another reading of the bytes
    shutil.copy(first, as_json)
    assert data.key(load_config(None, [f"data.input={as_json}"])) != key


def test_run_builds_once_then_serves_from_the_store(tmp_path):
    store = Store(tmp_path / "store")
    conf = load_config(None, [f"data.input={ASSETS / 'sharegpt.json'}"])
    first = data.run(conf, store)
    assert not first.cached and first.key == data.key(conf)
    assert {p.name for p in first.dir.iterdir()} >= {
        "train.json", "dev.json", "test.json", "rejected.jsonl", "report.json", "manifest.json"
    }  # fmt: skip
    second = data.run(conf, store)
    assert second.cached and second.path == first.path
    assert first.manifest()["report"]["kept"] == 2


def test_run_refuses_a_dataset_with_nothing_to_train_on(tmp_path):
    source = _write(tmp_path / "bad.jsonl", '{"instruction": "", "output": "x"}\n')
    conf = load_config(None, [f"data.input={source}"])
    with pytest.raises(DataError, match="no training records.*empty_prompt"):
        data.run(conf, Store(tmp_path / "store"))


# --- the shipped demo data ----------------------------------------------------------------


def test_demo_datasets_through_the_default_config(tmp_path):
    conf = load_config()
    assert conf.data.input == "datasets_raw"
    report = clean_dataset(REPO / conf.data.input, tmp_path, conf.data)
    files = {f["file"]: f for f in report["files"]}
    assert files["self_cognition.json"]["records"] >= 80
    assert files["law_qa.jsonl"]["records"] >= 200
    assert report["rejected"] == 0
    assert report["ignored_files"] == [  # data.exclude
        "README.md",
        "preference/law_pairs.jsonl",
        "tools/legal_tools_openai.jsonl",
        "tools/legal_tools_sharegpt.json",
    ]
    out = outputs(tmp_path)
    texts = [r["output"] for r in kept(out)]
    named = [t for t in texts if "Lexi" in t or "the llmft team" in t]
    assert len(named) >= 80 and not any("{{" in t for t in texts)
    chinese = [r for r in kept(out) if any("\u4e00" <= c <= "\u9fff" for c in r["instruction"])]
    assert len(chinese) >= 140
    held_out = [r["instruction"] for r in out["test"] if "Lexi" in r["output"]]
    assert held_out  # identity questions the model never trained on


def test_json_built_by_column_is_byte_identical_to_orjson():
    texts = ["plain", 'quote " and \\ backslash', "new\nline\ttab", "中文 é 😀 \u2028", "", "{}[]"]
    kept = {
        "instruction": pa.array(texts),
        "input": pa.array(texts[::-1]),
        "output": pa.array(texts[1:] + texts[:1]),
        "system": pa.array([None, 'sys "x"', None, "", "s\n", None]),
    }
    blob, ends = clean._buffer_and_ends(clean._json_by_column(kept))
    expected, expected_ends = clean._json_by_record(kept, None)
    assert bytes(blob)[: ends[-1]] == bytes(expected) and list(ends) == list(expected_ends)
    records = [json.loads(bytes(expected)[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    assert records[1]["system"] == 'sys "x"' and "system" not in records[3]

"""Tokenized dataset: the data stage's train/dev splits as token ids and labels (Arrow).

    artifacts/tokens/<key>/train.arrow   input_ids, labels (list<int32>), one row per record
                          dev.arrow
                          report.json    counts (kept, truncated, dropped), token totals, and
                                         one rendered example with its trained part marked

The key covers the data key, the tokenizer's files (their bytes) and the settings that
change the tokens (template, cutoff_len, train_on_prompt). Packing is not one of them: it
happens when batches are formed, so packed and padded runs share this artifact.

Run alone: `python -m tasks.train.tokens --spec FILE`, FILE a train stage spec (tasks/spec.py):
the tokens of its data for its base and train section; prints report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tasks.config import Config, UserError
from tasks.formatting import IGNORE, encode, resolve_template
from tasks.store import Ref, Store, hash_file, make_key, write_json_atomic

# the tokenizer, the chat template it renders (jinja2) and the Arrow tables written
LIBRARIES = ("transformers", "tokenizers", "jinja2", "pyarrow")
SPLITS = ("train", "dev")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


class TokenizeError(UserError):
    """The records cannot be tokenized as configured."""


def tokenizer_hashes(model_dir: Path) -> dict[str, str]:
    return {n: hash_file(model_dir / n) for n in TOKENIZER_FILES if (model_dir / n).is_file()}


def settings(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    return {
        "template": t.template,
        "cutoff_len": t.cutoff_len,
        "train_on_prompt": t.train_on_prompt,
        "pairs": t.objective != "sft",  # preference pairs: the rejected answers too
    }


def key(cfg: Config, data: Ref, base: Ref) -> str:
    from tasks.versions import version

    inputs = {"data": data.key, "tokenizer": tokenizer_hashes(base.dir / "model")}
    return make_key("tokens", version("tasks.train.tokens", LIBRARIES), settings(cfg), inputs)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from tasks.base import trusts_remote_code

    # a tokenizer can be model code too; base.trust_remote_code decides, off unless turned on
    trust = trusts_remote_code(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    if tokenizer.pad_token_id is None:  # padded positions are masked; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_split(
    tokenizer: Any, records: list[dict], cfg: Config, split: str
) -> tuple[dict[str, list], dict[str, int]]:
    t = cfg.train
    pairs = t.objective != "sft"
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    if pairs:  # the chosen answer in input_ids/labels, the rejected one beside it
        columns |= {"rejected_input_ids": [], "rejected_labels": []}
    counts = {"records": len(records), "kept": 0, "truncated": 0, "dropped": 0}
    counts |= {"tokens": 0, "label_tokens": 0} | ({"not_a_pair": 0} if pairs else {})
    for record in records:
        if pairs and record.get("rejected") is None:
            counts["not_a_pair"] += 1
            continue
        if pairs:
            both = encode_pair(tokenizer, record, t.template, t.cutoff_len, t.train_on_prompt)
            enc, rejected = both or (None, None)
            if rejected is not None:
                columns["rejected_input_ids"].append(rejected.input_ids)
                columns["rejected_labels"].append(rejected.labels)
                counts["tokens"] += len(rejected.input_ids)
        else:
            enc = encode(tokenizer, record, t.template, t.cutoff_len, t.train_on_prompt)
        if enc is None:
            counts["dropped"] += 1
            continue
        columns["input_ids"].append(enc.input_ids)
        columns["labels"].append(enc.labels)
        counts["kept"] += 1
        counts["truncated"] += enc.truncated
        counts["tokens"] += len(enc.input_ids)
        counts["label_tokens"] += sum(1 for x in enc.labels[1:] if x != IGNORE)
    if pairs and split == "train" and not counts["kept"]:
        raise TokenizeError(
            f"train.objective={t.objective} needs preference pairs (records with chosen and "
            f"rejected answers; docs/preference.md), and the train split has none "
            f"(fix: --set data.input=datasets_raw/preference, or train.objective=sft)"
        )
    if records and not counts["kept"]:
        raise TokenizeError(
            f"{split}: every record's prompt is at least train.cutoff_len={t.cutoff_len} "
            f"tokens long, so nothing is left to train on (fix: --set train.cutoff_len=1024)"
        )
    return columns, counts


def encode_pair(
    tokenizer: Any, record: dict, template: str, cutoff_len: int, train_on_prompt: bool = False
) -> tuple[Any, Any] | None:
    """(chosen, rejected) encodings of a pair record, sharing its prompt; None when either
    leaves nothing to train on (the prompt alone fills cutoff_len)."""
    chosen = encode(tokenizer, record, template, cutoff_len, train_on_prompt)
    other = {**record, "output": record["rejected"]}
    rejected = encode(tokenizer, other, template, cutoff_len, train_on_prompt)
    return None if chosen is None or rejected is None else (chosen, rejected)


def write_arrow(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    table = pa.table({name: pa.array(values, type=ints) for name, values in columns.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_table(ref_dir: Path, split: str) -> Any:
    """The split as a memory-mapped pyarrow Table (`.take(indices).to_pylist()` → rows)."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(ref_dir / f"{split}.arrow"))).read_all()


def example(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The first record with its trained span in [[…]], for report.json and the docs."""
    cut = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
    return tokenizer.decode(ids[:cut]) + "[[" + tokenizer.decode(ids[cut:]) + "]]"


def run(cfg: Config, store: Store, data: Ref, base: Ref) -> Ref:
    model_dir = base.dir / "model"

    def work(tmp: Path) -> dict:
        tokenizer = load_tokenizer(model_dir)
        report = settings(cfg) | {"template": resolve_template(tokenizer, cfg.train.template)}
        for split in SPLITS:
            records = json.loads((data.dir / f"{split}.json").read_text(encoding="utf-8"))
            columns, counts = tokenize_split(tokenizer, records, cfg, split)
            write_arrow(tmp / f"{split}.arrow", columns)
            report[split] = counts
            if split == "train" and columns["input_ids"]:
                report["example"] = example(
                    tokenizer, columns["input_ids"][0], columns["labels"][0]
                )
        write_json_atomic(tmp / "report.json", report)
        return {"report": {s: report[s] for s in SPLITS}}

    inputs = {"data": data.key, "tokenizer": tokenizer_hashes(model_dir)}
    return store.build("tokens", key(cfg, data, base), work, inputs=inputs, config=settings(cfg))


def main() -> None:
    from tasks.spec import read_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="a train stage spec (its data and base)")
    args = parser.parse_args()
    cfg, spec = read_spec(args.spec, "train")
    data, base = (Ref(**spec["inputs"][name]) for name in ("data", "base"))
    ref = run(cfg, Store(spec["store"]), data, base)
    print(json.dumps(json.loads((ref.dir / "report.json").read_text()), indent=2))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

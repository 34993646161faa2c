"""The config sections of the stages other than training (data, base, evaluate, export,
serve, pipeline), the shared `Section` base and the errors a user can fix;
tasks/train_sections.py holds the train section, tasks/config.py the whole `Config` and its
loading."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class UserError(ValueError):
    """A problem the user can fix (bad config, bad input file): printed, exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration problem, naming each key, the value received and the fix."""


class Invalid(ValueError):
    """Raised by a field validator: the problem, and the fix to print for it (without one,
    the message says `--set <key>=<valid value>`)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.fix = fix


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    input: str = Field(
        "datasets_raw",
        description="Dataset file or folder (JSON array, JSONL, CSV, Parquet); relative paths "
        "are resolved from the working directory.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns, relative to a folder input, of files to leave out (they "
        "are listed under ignored_files in the report), e.g. ['preference/*'].",
    )
    format: Literal["auto", "alpaca", "columns", "messages", "sharegpt", "preference"] = Field(
        "auto",
        description="Record shape: auto-detect per file, alpaca (instruction/input/output), "
        "columns (prompt_column/response_column), messages (role/content), "
        "sharegpt (conversations from/value), preference (chosen and rejected answers to a "
        "prompt, conversations or messages; docs/preference.md).",
    )
    prompt_column: str = Field(
        "instruction",
        description="Prompt column for format=columns; auto-detection picks columns when "
        "both named columns exist and are not instruction/output.",
    )
    response_column: str = Field("output", description="Response column for format=columns.")
    system_column: str | None = Field(
        None, description="Optional system-prompt column for format=columns."
    )
    normalize_unicode: bool = Field(True, description="Apply Unicode NFC normalisation.")
    strip_control: bool = Field(
        True,
        description="Remove control characters except newline and tab, plus zero-width "
        "space and BOM; CRLF and CR become newline.",
    )
    collapse_whitespace: bool = Field(
        True,
        description="Trim each field, drop spaces at line ends, squeeze runs of spaces or "
        "tabs inside a line to one (indentation kept), at most one blank line in a row.",
    )
    max_chars: int = Field(
        16000,
        gt=0,
        description="Reject records whose text (all fields together) exceeds this many characters.",
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Reject records whose text is longer than this many tokens "
        "(needs data.tokenizer).",
    )
    tokenizer: str | None = Field(
        None,
        description="Folder holding tokenizer.json, used only to count tokens for "
        "data.max_tokens (e.g. the base model's folder).",
    )
    max_line_bytes: int = Field(
        1 << 20,
        gt=0,
        description="JSON Lines: a longer line is rejected unparsed (too_long) so one huge "
        "line cannot exhaust memory.",
    )
    dedupe: bool = Field(
        True,
        description="Drop exact duplicates after normalisation (all fields equal; the "
        "first one read is kept).",
    )
    placeholders: dict[str, str] = Field(
        default_factory=lambda: {"name": "Lexi", "author": "the llmft team"},
        description="Values for {{placeholders}} such as {{name}} and {{author}} in "
        "self-cognition data.",
    )
    split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/dev/test ratios; must sum to 1."
    )
    seed: int = Field(42, description="Seed of the prompt hash that assigns splits.")
    max_samples: int | None = Field(
        None,
        gt=0,
        description="Keep at most this many training records, the first ones read; the "
        "rest are rejected as over_max_samples (dev and test are not capped).",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Processes that parse and clean big JSON Lines files (0: one per CPU "
        "core; 1: none). The output is the same for any value.",
    )

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, split: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in split) or abs(sum(split) - 1.0) > 1e-6:
            raise Invalid(
                f"the ratios must be non-negative and sum to 1 (these sum to {sum(split):g})",
                fix="--set data.split=[0.8,0.1,0.1]",
            )
        return split


class BaseModelConfig(Section):
    model: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Base model: 'bundled:smollm2-135m-instruct', a local HF folder, or a hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model folder or hub; off unless needed."
    )


class EvaluateConfig(Section):
    num_samples: int = Field(32, ge=0, description="Test records to generate answers for.")
    max_new_tokens: int = Field(64, gt=0, description="Generation length for evaluation.")
    batch_size: int = Field(8, gt=0, description="Batch size for loss and generation.")
    compare_base: bool = Field(True, description="Also score the base model on the same prompts.")
    max_loss_records: int = Field(
        256, gt=0, description="Dev and test records (each) used for loss and perplexity."
    )
    zh_segmentation: Literal["jieba", "char"] = Field(
        "jieba",
        description="How Chinese text is split into tokens for BLEU/ROUGE: jieba words or "
        "single characters.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to evaluate (auto: CUDA when available)."
    )
    cpu_threads: int = Field(
        1,
        gt=0,
        description="torch threads when evaluating on CPU. Decoding a small batch is a chain "
        "of tiny ops where threads mostly wait for each other: on 2 shared cores, 3 prompts "
        "x 16 tokens took 5 s with 1 thread and 245 s with 2.",
    )
    identity_prompts: int = Field(
        64,
        ge=0,
        description="Self-cognition data (test references that contain data.placeholders' "
        "name or author): at most this many such test prompts are answered by base and tuned "
        "to measure how often the answer names the assistant (name_rate) and its author "
        "(author_rate).",
    )


# Types llama.cpp's quantizer accepts without an importance matrix (names as in llama-quantize).
QUANT_TYPES = [
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
]


class ExportConfig(Section):
    enabled: bool = Field(True, description="Convert to GGUF (skipped for ptuning).")
    outtype: Literal["f16", "bf16", "f32"] = Field("f16", description="GGUF conversion type.")
    quantize: list[str] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        description=f"llama.cpp quantisation types, any of: {', '.join(QUANT_TYPES)}.",
    )
    lora_adapter: bool = Field(
        True,
        description="LoRA/QLoRA: also write the adapter as a GGUF adapter, with the base "
        "model as a GGUF beside it, so llama.cpp can serve base + adapter unmerged.",
    )
    verify_prompts: int = Field(16, ge=1, description="Dev records used to verify each GGUF.")
    speed_tokens: int = Field(
        32, gt=0, description="Tokens generated per GGUF to measure CPU tokens/s."
    )
    ppl_tolerance: float = Field(
        0.05, ge=0, description="Serve the smallest GGUF whose perplexity is within this of HF."
    )
    max_ppl_ratio: float = Field(
        2.0,
        gt=1,
        description="Fail the stage if any GGUF's perplexity exceeds HF's times this.",
    )
    min_agreement_pct: float = Field(
        90.0,
        ge=0,
        le=100,
        description="Greedy next-token agreement with HF (%) a GGUF needs to be served; the "
        "stage fails if the unquantized conversion (outtype) is below it.",
    )
    fail_stage: bool = Field(
        False, description="Fault switch for tests: make the export stage fail."
    )

    @field_validator("quantize")
    @classmethod
    def _known_quant_types(cls, quantize: list[str]) -> list[str]:
        unknown = [q for q in quantize if q not in QUANT_TYPES]
        if unknown:
            raise Invalid(
                f"unknown quantisation type(s) {unknown}; choose from {QUANT_TYPES}",
                fix="--set export.quantize=[q8_0,q4_k_m]",
            )
        return quantize


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address of the API server.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of the API server.")
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer KEY'.")
    n_ctx: int = Field(
        2048,
        gt=0,
        description="Context of one request in tokens (prompt + answer); the server's KV "
        "cache holds n_ctx × max_concurrent tokens.",
    )
    n_threads: int | None = Field(None, gt=0, description="CPU threads (None: all cores).")
    max_prompt_tokens: int = Field(1536, gt=0, description="Reject longer prompts with 400.")
    max_tokens: int = Field(512, gt=0, description="Reject larger max_tokens with 400.")
    default_max_tokens: int = Field(
        256, gt=0, description="max_tokens when a request gives none (capped by max_tokens)."
    )
    max_concurrent: int = Field(
        16,
        gt=0,
        le=256,
        description="Requests generating at once: sequence slots of one llama.cpp context, "
        "decoded together in each step.",
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting beyond that before 429.")
    prefill_chunk: int = Field(
        128,
        gt=0,
        description="Prompt tokens added to one decode step; a longer prompt is spread over "
        "several steps so the requests already generating keep getting tokens.",
    )
    max_body_bytes: int = Field(
        1_048_576, gt=0, description="Reject larger request bodies with 413 before parsing."
    )
    cache_prompt: bool = Field(
        True,
        description="Keep a finished request's KV cells in its slot; a new request goes to "
        "the free slot that shares the longest start with its prompt (the next turn of a "
        "chat, a common system prompt) and decodes only the rest.",
    )


class PipelineConfig(Section):
    name: str = Field("default", description="Model name used for deployment/promotion.")
    store: str = Field("artifacts", description="Artifact store folder.")
    identity_prompt: str = Field(
        "Who are you?", description="Prompt asked of the served GGUF at the end of a run."
    )
    promote: bool = Field(
        True,
        description="Promote the served GGUF if it passes the floor (promote_margin, "
        "promote_min_name_rate) and is at least as good as the deployed one.",
    )
    promote_samples: int = Field(
        16,
        gt=0,
        description="Test prompts both the candidate and the deployed GGUF answer before "
        "promotion; the mean ROUGE-L F1 of their answers is compared.",
    )
    promote_margin: float | None = Field(
        1.0,
        description="Floor: ROUGE-L F1 points (0-100, evaluate's main metric on its test "
        "answers) the tuned model must gain over the base to be promoted, the first model "
        "included (None: no comparison with the base).",
    )
    promote_min_name_rate: float = Field(
        80.0,
        ge=0,
        le=100,
        description="Floor for self-cognition data: the % of held-out identity prompts whose "
        "answer from the served GGUF must contain data.placeholders.name to be promoted.",
    )
    stage_timeout_minutes: float = Field(
        720,
        gt=0,
        description="Kill a heavy stage's child process (train, evaluate, merge, export) "
        "after this long; a killed training resumes from its last checkpoint on a retry.",
    )
    train_on: Literal["auto", "local", "gpu-pool"] = Field(
        "auto",
        description="Where training runs: 'local' (a subprocess here), 'gpu-pool' (the "
        "llmft-train/gpu deployment on the gpu work pool; the store must be shared), "
        "'auto' (the gpu pool when a server has it with a worker online, else local).",
    )

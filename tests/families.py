"""Tiny models of real families: the real tokenizer and chat template, random 2-layer weights.

Each family is built from material that ships with llama-cpp-python's sdist (fetched by
`python -m tasks.export --fetch-converter` into .cache/llama-cpp/): a vocabulary-only GGUF
(`models/ggml-vocab-*.gguf`, from which transformers rebuilds the HF tokenizer) and a real
chat template (`models/templates/*.jinja`); the weights are a random model of the family's
own architecture class, hidden 64 and 2 layers, so a training step, a conversion and a
quantization take seconds. SmolLM2 takes its tokenizer and template from the bundled GGUF.

Gemma is not built: transformers cannot read the only Gemma vocabulary shipped (gemma-4),
and the Gemma 2 template needs Gemma's tokens. StarCoder2 takes its place: a real
architecture with a real vocabulary and no chat template of its own, so it covers the
alpaca fallback travelling into the GGUF.

Rebuilding a 128k or 152k vocabulary takes transformers 20-70 s on 2 cores, so the folders
are kept under .cache/test-families/ (git-ignored, never committed), keyed by the family,
the tiny sizes, BUILD and the library versions; a new key builds anew.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "test-families"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # transformers class; its config class is the same name with Config
    vocab: str | None  # models/ggml-vocab-<vocab>.gguf; None: the bundled SmolLM2 GGUF
    template: str | None  # models/templates/<template>.jinja; None: the vocabulary's own
    end_of_turn: str  # what closes an answer in the real model
    bos_in_prompt: int  # BOS tokens in a rendered chat prompt (the template writes its own)
    tokens: dict[str, str] = field(default_factory=dict)  # the real model's special tokens
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos_token_id, as shipped
    config: dict[str, Any] = field(default_factory=dict)
    # How the real tokenizer.json splits text where the one transformers rebuilds from the
    # vocabulary GGUF differs (llama.cpp's .inp/.out cases, from the real one, tell):
    # "llama-legacy": Prepend + Replace normalizer, no pre-tokenizer (Llama 2, Mistral 7B);
    # "digits": each digit apart before the byte-level split (StarCoder)
    splitting: str = ""
    sentencepiece: bool = False  # the real repository ships tokenizer.model
    # tokenizer_config.json's tokenizer_class where the class transformers picks would
    # rebuild the splitting and drop the real one (see docs/fidelity.md, StarCoder2)
    tokenizer_class: str = ""
    # special tokens that do NOT strip the whitespace after them; every other special token
    # does (rstrip in tokenizer.json), as Phi-3's real tokenizer ships; None: none strips
    rstrip_except: tuple[str, ...] | None = None
    # llama.cpp tokenizer cases the tokenizer transformers rebuilds from the vocabulary GGUF
    # gets wrong (merges it does not rebuild); HF and the exported GGUF still agree on them
    rebuilt_misses: tuple[str, ...] = ()
    # Mistral's template writes the system text into the last user turn only while that
    # turn is the last message, so a conversation with its answer drops it: training
    # cannot split such a record into prompt and answer (formatting.FormatError)
    trains_system: bool = True


FAMILIES = [
    Family(
        "llama3",
        "LlamaForCausalLM",
        "llama-bpe",
        "meta-llama-Llama-3.1-8B-Instruct",
        "<|eot_id|>",
        1,
        tokens={"eos_token": "<|eot_id|>"},
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        config={"tie_word_embeddings": True, "rope_theta": 500000.0},
        rebuilt_misses=("Cửa Việt",),
    ),
    Family(
        "mistral",
        "MistralForCausalLM",
        "llama-spm",
        "mistralai-Mistral-Nemo-Instruct-2407",
        "</s>",
        1,
        config={"tie_word_embeddings": False, "sliding_window": None},
        splitting="llama-legacy",
        sentencepiece=True,
        trains_system=False,
    ),
    Family(
        "qwen2.5",
        "Qwen2ForCausalLM",
        "qwen2",
        "Qwen-Qwen2.5-7B-Instruct",
        "<|im_end|>",
        0,
        tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        config={"tie_word_embeddings": True},
    ),
    Family(
        "phi3",
        "Phi3ForCausalLM",
        "phi-3",
        "microsoft-Phi-3.5-mini-instruct",
        "<|end|>",
        0,
        generation_eos=("<|end|>", "<|endoftext|>"),
        config={"tie_word_embeddings": False, "pad_token_id": 32000},
        sentencepiece=True,  # the converter reads Phi-3's vocabulary from it
        rstrip_except=("<unk>", "<s>", "<|endoftext|>"),
    ),
    Family(
        "starcoder2",
        "Starcoder2ForCausalLM",
        "starcoder",
        None,
        "<|endoftext|>",
        0,
        config={"tie_word_embeddings": True, "sliding_window": None},
        splitting="digits",
        tokenizer_class="PreTrainedTokenizerFast",
    ),
    Family(
        "smollm2",
        "LlamaForCausalLM",
        None,
        None,
        "<|im_end|>",
        1,  # SmolLM2's BOS is <|im_start|>, which opens every turn
        config={"tie_word_embeddings": True},
        # the real tokenizer.json splits digits apart, as llama.cpp's smollm pre-tokenizer
        # does; the tokenizer rebuilt from the bundled GGUF does not (docs/fidelity.md)
        splitting="digits",
        tokenizer_class="PreTrainedTokenizerFast",
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}
BUILD = "3"  # how `build` makes a folder; raise it when that changes (the cache key)


def material() -> Path:
    """llama.cpp's models/ folder (vocabulary GGUFs, .inp/.out cases, templates/)."""
    from tasks.export import fetch_converter

    return fetch_converter() / "models"


def _tokenizer(family: Family) -> Any:
    from transformers import AutoTokenizer

    if family.vocab is None:  # SmolLM2: tokenizer and template of the bundled GGUF
        from tasks.base import BUNDLED, bundled_gguf

        gguf = bundled_gguf(next(iter(BUNDLED)))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tok = AutoTokenizer.from_pretrained(
            str(material()), gguf_file=f"ggml-vocab-{family.vocab}.gguf"
        )
        # a vocabulary GGUF may carry a template of its own; the family's is the real one
        tok.chat_template = None
    if family.template:
        tok.chat_template = (material() / "templates" / f"{family.template}.jinja").read_text()
    for name, token in family.tokens.items():
        setattr(tok, name, token)
    _split_as_shipped(tok.backend_tokenizer, family.splitting)
    return tok


def _split_as_shipped(backend: Any, splitting: str) -> None:
    from tokenizers import normalizers, pre_tokenizers

    if splitting == "llama-legacy":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        backend.pre_tokenizer = None
    elif splitting == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def sentencepiece_model(vocab: str) -> bytes:
    """tokenizer.model (SentencePiece BPE, byte fallback) of the vocabulary GGUF's pieces up
    to its last normal or byte piece (later ones are added tokens, as in the real file),
    with their scores and types (GGUF and SentencePiece number types alike)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as spm

    reader = gguf.GGUFReader(material() / f"ggml-vocab-{vocab}.gguf")

    def values(key: str, convert: Any) -> list[Any]:
        array = reader.fields[f"tokenizer.ggml.{key}"]
        return [convert(array.parts[i]) for i in array.data]

    tokens = values("tokens", lambda part: bytes(part).decode())
    scores = values("scores", lambda part: float(part[0]))
    types = values("token_type", lambda part: int(part[0]))
    size = 1 + max(i for i, t in enumerate(types) if t in (1, 6))  # NORMAL, BYTE
    unknown = spm.ModelProto.SentencePiece.UNKNOWN
    model = spm.ModelProto()
    for i in range(size):
        # SentencePiece wants its unknown piece (0) typed UNKNOWN; GGUFs may mark it CONTROL
        model.pieces.add(piece=tokens[i], score=scores[i], type=unknown if i == 0 else types[i])
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.vocab_size = size
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    return model.SerializeToString()


def _key(family: Family) -> str:
    parts = [BUILD.encode(), repr(family).encode(), repr(TINY).encode()]
    parts += [version(p).encode() for p in ("transformers", "llama-cpp-python", "torch")]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def build(family: Family) -> Path:
    """The family's base model folder (config, safetensors, tokenizer with its template)."""
    out = CACHE / f"{family.name}-{_key(family)}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers

    tok = _tokenizer(family)
    config_class = getattr(transformers, family.architecture.replace("ForCausalLM", "Config"))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = config_class(vocab_size=len(tok), **(ids | TINY | family.config))
    torch.manual_seed(0)
    model = getattr(transformers, family.architecture)(config)
    if family.generation_eos:
        eos = [tok.convert_tokens_to_ids(t) for t in family.generation_eos]
        model.generation_config.eos_token_id = eos
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tok.save_pretrained(partial)
    if family.tokenizer_class:
        config_file = partial / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text())
        tok_config["tokenizer_class"] = family.tokenizer_class
        config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    if family.rstrip_except is not None:
        tok_file = partial / "tokenizer.json"
        spec = json.loads(tok_file.read_text())
        for added in spec["added_tokens"]:
            if added["special"]:
                added["rstrip"] = added["content"] not in family.rstrip_except
        tok_file.write_text(json.dumps(spec, ensure_ascii=False))
    if family.sentencepiece:
        model_file = sentencepiece_model(family.vocab)
        (partial / "tokenizer.model").write_bytes(model_file)
    (partial / "family.json").write_text(json.dumps({"family": family.name}))
    partial.rename(out)
    return out


def vocab_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer cases for a vocabulary: (text, the original tokenizer's ids).

    The .inp file holds each text followed by a separator line; the .out file one line of
    ids per text (convert_hf_to_gguf_update.py writes both).
    """
    base = material() / f"ggml-vocab-{vocab}.gguf"
    inp = Path(f"{base}.inp").read_text(encoding="utf-8")
    out = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, out, strict=False)]

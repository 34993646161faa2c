"""Tool calling through the OpenAI API: `tools` / `tool_choice` in, `tool_calls` out, whole
and streamed, driven by the official `openai` client; the served prompt is the trained one."""

import os

# As `llmft serve` sets it (tasks/serve/__init__.py): llama.cpp threads that sleep at their
# barriers, which keeps these tests from crawling while other processes share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import functools
import json
from types import SimpleNamespace

import openai
import pytest
from serving_fixtures import LiveServer

from tasks import conversation, serve
from tasks.base import bundled_gguf
from tasks.config import REPO_ROOT, ServeConfig
from tasks.serve.engine import Engine
from tasks.serve.protocol import Refusal, parse_options
from tasks.serve.tools import (
    CallStream,
    Tools,
    chat_messages,
    hermes_calls,
    parse_tools,
    render,
    split_calls,
)

TEMPLATES = REPO_ROOT / ".cache" / "llama-cpp"
LIMIT = {
    "type": "function",
    "function": {
        "name": "small_claims_limit",
        "description": "The small-claims cap of a US state.",
        "parameters": {
            "type": "object",
            "properties": {"jurisdiction": {"type": "string", "enum": ["Texas", "Ohio"]}},
            "required": ["jurisdiction"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount between currencies.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "to": {"type": "string", "enum": ["EUR", "USD"]},
            },
            "required": ["amount", "to"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the small claims limit in Texas?"}]
# The question, the call (content null, arguments as text, as OpenAI sends them), the result.
HISTORY = QUESTION + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "small_claims_limit", "arguments": "{\"jurisdiction\": \"Texas\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"limit\": \"$20,000\"}"},
]  # fmt: skip


# --- without the model ------------------------------------------------------------------


def tools_of(body: dict) -> Tools | None:
    return parse_tools(body, parse_options(body, chat=True, cfg=ServeConfig()))


def stream(text: str, size: int, tools: Tools) -> tuple[list[str], str, list[dict]]:
    """`text` fed `size` characters at a time: (pieces sent on the way, final text, calls)."""
    calls = CallStream(tools)
    sent = [calls.feed(text[i : i + size]) for i in range(0, len(text), size)]
    tail, found = calls.finish()
    return sent, tail, found


CALL = '<tool_call>\n{"name": "small_claims_limit", "arguments": {"jurisdiction": "Texas"}}\n</tool_call>'
SECOND = '<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 5, "to": "EUR"}}\n</tool_call>'


@pytest.mark.parametrize(
    "text",
    [
        CALL,
        "Let me look that up.\n" + CALL,
        "  Checking both.\n" + CALL + "\n" + SECOND + "\nDone.",
        "Plain answer, no call at all.",
        'A tag that never closes: <tool_call>\n{"name": "x"',
        "Less-than signs < and <tool are text.",
        "<tool_call>not json</tool_call> then text",
        CALL + '\n<tool_call>\n{"name": "convert_cur',  # the second cut off by max_tokens
    ],
)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_streamed_text_and_calls_agree_with_the_whole_answer(text, size):
    tools = Tools([LIMIT, CONVERT])
    sent, tail, calls = stream(text, size, tools)
    rest, whole_calls = split_calls(text, tools)
    strip = lambda cs: [c["function"] for c in cs]  # noqa: E731  ids are fresh per answer
    assert strip(calls) == strip(whole_calls)
    assert ("".join(sent) + tail).strip() == rest.strip()
    if whole_calls:  # not one character of a call, whole or cut off, went out as text
        assert not any("<" in piece for piece in sent) and "<tool_call>" not in tail
        assert "<tool_call>" not in rest
        assert all(c["id"].startswith("call_") for c in calls)
        assert all(json.loads(c["function"]["arguments"]) for c in calls)
    else:
        assert "".join(sent) + tail == text


def test_plain_text_streams_as_it_comes_and_a_possible_tag_waits():
    calls = CallStream(Tools([LIMIT]))
    assert calls.feed("The limit") == "The limit"
    assert calls.feed(" is <tool") == " is"  # the space may precede a call
    assert calls.feed("s> etc.") == " <tools> etc."
    assert calls.finish() == ("", [])


def test_parallel_calls_off_keeps_the_first_call():
    one = Tools([LIMIT, CONVERT], parallel=False)
    _, calls = split_calls(CALL + "\n" + SECOND, one)
    assert [c["function"]["name"] for c in calls] == ["small_claims_limit"]
    _, calls = split_calls(CALL, Tools([LIMIT], choice="none"))
    assert calls == []  # tool_choice "none": a call-looking text stays text


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"tools": {"name": "x"}}, "tools must be a list"),
        ({"tools": [{"type": "function"}]}, "tools[0].function must be"),
        ({"tools": [LIMIT, {"function": {"name": "f"}}]}, 'tools[1].type must be "function"'),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [LIMIT, LIMIT]}, "'small_claims_limit' is given twice"),
        ({"tools": [LIMIT] * 129}, "the limit is 128"),
        ({"tools": [LIMIT], "tool_choice": "sometimes"}, "tool_choice must be"),
        (
            {"tools": [LIMIT], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name 'nope'",
        ),
        ({"tool_choice": "required"}, 'tool_choice "required" needs tools'),
        ({"tools": [LIMIT], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {"tools": [LIMIT], "tool_choice": "required", "grammar": 'root ::= "a"'},
            "forced tool_choice",
        ),
    ],
)
def test_malformed_tools_are_refused_naming_the_field(body, names):
    with pytest.raises(Refusal) as caught:
        tools_of(body)
    assert caught.value.status == 400 and names in caught.value.message


def test_tool_choice_defaults_and_what_the_model_is_offered():
    assert tools_of({}) is None
    auto = tools_of({"tools": [LIMIT]})
    assert (auto.choice, auto.offered, auto.forced) == ("auto", [LIMIT], False)
    assert tools_of({"tools": [LIMIT], "tool_choice": "none"}).offered is None
    named = tools_of({"tools": [LIMIT, CONVERT], "tool_choice": {"type": "function",
                      "function": {"name": "convert_currency"}}})  # fmt: skip
    assert (named.choice, named.name, named.forced) == ("function", "convert_currency", True)


def test_request_messages_become_the_training_form():
    messages = chat_messages(HISTORY)
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "small_claims_limit",
                                                         "arguments": {"jurisdiction": "Texas"}}}],
    }  # fmt: skip
    assert messages[2] == {"role": "tool", "content": '{"limit": "$20,000"}'}
    bad_args = copy.deepcopy(HISTORY)
    bad_args[1]["tool_calls"][0]["function"]["arguments"] = "{jurisdiction: Texas"
    with pytest.raises(Refusal, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        chat_messages(bad_args)
    with pytest.raises(Refusal, match=r"messages\[1\]: a tool result must follow"):
        chat_messages(QUESTION + [HISTORY[2]])
    with pytest.raises(Refusal, match=r"messages\[0\]\.content must be text"):
        chat_messages([{"role": "user", "content": None}])


@pytest.fixture(scope="module")
def bundled():
    return bundled_gguf("bundled:smollm2-135m-instruct")


def template_engine(gguf, template: str | None = None):
    """What `render` needs of an engine, without the weights: the GGUF's tokenizer, and its
    chat template or another one."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = serve.load_vocab(gguf)
    if template is not None:
        vocab.metadata["tokenizer.chat_template"] = template
    formatter = serve.chat_formatter(vocab)
    if template is not None:
        formatter = Jinja2ChatFormatter(template, "<|im_end|>", "<|im_start|>")
    engine = SimpleNamespace(tokenizer=vocab, formatter=formatter)
    engine.chat_prompt = functools.partial(Engine.chat_prompt, engine)  # the server's own
    return engine


def qwen_template() -> str:
    (path,) = TEMPLATES.glob("*/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja")
    return path.read_text()


@pytest.mark.parametrize("template", ["own", "qwen2.5"])
def test_the_served_prompt_is_the_trained_prompt(bundled, base_model_dir, template):
    """A tool conversation as a request renders to the tokens training's prompt has, with
    SmolLM2's own template (the Hermes fallback) and with Qwen 2.5's tool-aware one."""
    from tasks.train.tokens import load_tokenizer

    tokenizer = load_tokenizer(base_model_dir)
    engine = template_engine(bundled)
    if template == "qwen2.5":
        tokenizer.chat_template = qwen_template()
        engine = template_engine(bundled, tokenizer.chat_template)
    system = "You are a legal assistant."
    request = [{"role": "system", "content": system}] + HISTORY
    record = {
        "system": system,
        "messages": chat_messages(HISTORY) + [{"role": "assistant", "content": "$20,000."}],
        "tools": [LIMIT],
    }
    trained = conversation.prompt_text(tokenizer, record)
    tokens, stops = render(engine, chat_messages(request), Tools([LIMIT]))
    assert tokens == engine.tokenizer.tokenize(trained.encode(), add_bos=False, special=True)
    assert "<tools>" in trained and '{"limit": "$20,000"}' in trained
    assert "<|im_end|>" in stops


def test_templates_whose_calls_the_server_cannot_read_are_found_out(bundled):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    own = template_engine(bundled)
    assert hermes_calls(own.formatter, own.tokenizer.metadata["tokenizer.chat_template"])
    assert hermes_calls(Jinja2ChatFormatter(qwen_template(), "", ""), qwen_template())
    (llama,) = TEMPLATES.glob("*/models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja")
    formatter = Jinja2ChatFormatter(llama.read_text(), "<|eot_id|>", "<|begin_of_text|>")
    assert not hermes_calls(formatter, llama.read_text())
    engine = SimpleNamespace(
        tokenizer=SimpleNamespace(metadata={"tokenizer.chat_template": llama.read_text()}),
        formatter=formatter,
    )
    with pytest.raises(Refusal, match="does not read"):
        render(engine, chat_messages(QUESTION), Tools([LIMIT]))


# --- through the server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(bundled):
    cfg = ServeConfig(n_ctx=1024, max_concurrent=2, max_tokens=200, max_body_bytes=20_000)
    live = LiveServer(serve.create_app(cfg, model=str(bundled)))
    yield openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    live.stop()


def ask(client, **kwargs):
    args = dict(model="any", messages=QUESTION, temperature=0, max_tokens=60) | kwargs
    return client.chat.completions.create(**args)


NAMED = {"type": "function", "function": {"name": "small_claims_limit"}}


def test_a_named_tool_choice_returns_that_call(client):
    out = ask(client, tools=[CONVERT, LIMIT], tool_choice=NAMED)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "small_claims_limit"
    assert json.loads(call.function.arguments)["jurisdiction"] in {"Texas", "Ohio"}


def test_streamed_tool_calls_equal_the_whole_answer(client):
    # "required" with parallel calls allowed: the model writes two calls (36 tokens each)
    whole = ask(client, tools=[CONVERT, LIMIT], tool_choice="required", max_tokens=100)
    args = dict(model="any", messages=QUESTION, temperature=0, max_tokens=100)
    with client.chat.completions.stream(
        **args, tools=[CONVERT, LIMIT], tool_choice="required"
    ) as s:
        deltas = [e.chunk.choices[0].delta for e in s if e.type == "chunk" and e.chunk.choices]
        streamed = s.get_final_completion()
    assert not any("tool_call" in (d.content or "") for d in deltas)  # held back, not text
    calls = lambda out: [  # noqa: E731
        (c.function.name, json.loads(c.function.arguments))
        for c in out.choices[0].message.tool_calls
    ]
    assert calls(streamed) == calls(whole)
    assert {name for name, _ in calls(whole)} <= {"small_claims_limit", "convert_currency"}
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    assert [c.id for c in streamed.choices[0].message.tool_calls] != [
        c.id for c in whole.choices[0].message.tool_calls
    ]  # every answer's calls have their own ids


def test_a_call_cut_off_by_max_tokens_is_neither_text_nor_a_call(client):
    # The model writes a second call (a call is 36 tokens) that 50 tokens do not finish.
    out = ask(client, tools=[CONVERT, LIMIT], tool_choice="required", max_tokens=50)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content is None
    assert len(out.choices[0].message.tool_calls) == 1


def test_tool_choice_none_answers_in_text_without_the_tools(client):
    none = ask(client, tools=[CONVERT, LIMIT], tool_choice="none", max_tokens=12)
    auto = ask(client, tools=[CONVERT, LIMIT], max_tokens=1)
    plain = ask(client, max_tokens=12)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens


def test_plain_content_still_streams_token_by_token_with_tools_offered(client):
    question = [{"role": "user", "content": "Say hello to my friend."}]
    whole = ask(client, messages=question, tools=[LIMIT], max_tokens=16)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in ask(client, messages=question, tools=[LIMIT], max_tokens=16, stream=True)
    ]
    assert whole.choices[0].message.tool_calls is None
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces) == whole.choices[0].message.content


def test_a_conversation_with_a_call_and_its_result_is_answered(client):
    out = ask(client, messages=HISTORY, tools=[LIMIT], max_tokens=12)
    asked = ask(client, tools=[LIMIT], max_tokens=1)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content  # an answer, after the result
    assert out.usage.prompt_tokens > asked.usage.prompt_tokens + 20  # the call and result are in


def test_malformed_requests_are_400_naming_the_field(client):
    bad_tool = {"type": "function", "function": {"name": "has space"}}
    with pytest.raises(openai.BadRequestError, match=r"tools\[1\]\.function\.name"):
        ask(client, tools=[LIMIT, bad_tool])
    history = copy.deepcopy(HISTORY)
    history[1]["tool_calls"][0]["function"]["arguments"] = "not json"
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.tool_calls\[0\]"):
        ask(client, messages=history, tools=[LIMIT])
    with pytest.raises(openai.BadRequestError, match="tool_choice.function.name 'nope'"):
        ask(client, tools=[LIMIT], tool_choice={"type": "function", "function": {"name": "nope"}})

"""The OpenAI-compatible API, driven by the official `openai` client as a user would."""

import os

# As `llmft serve` sets it (tasks/serve/__init__.py): llama.cpp threads that sleep at their
# barriers, which keeps these tests from crawling while other processes share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serving_fixtures import NAME, LiveServer, make_export

from tasks import serve
from tasks.base import bundled_gguf
from tasks.config import ServeConfig
from tasks.store import write_json_atomic

KEY = "test-key"
EOS = 2  # <|im_end|> in SmolLM2's vocabulary
NO_EOS = {str(EOS): -100}  # the answer surely runs to max_tokens
# Two slots and one queued request: the fourth request at once is refused.
LIMITS = dict(
    n_ctx=512,
    max_prompt_tokens=200,
    max_tokens=400,
    max_concurrent=2,
    max_queue=1,
    max_body_bytes=20_000,
)


@pytest.fixture(scope="module")
def trained(test_store, base_model_dir) -> Path:
    """The fine-tuned model's served GGUF (it knows its name, NAME)."""
    return make_export(test_store)[0].dir / "model-q8_0.gguf"


@pytest.fixture(scope="module")
def bundled() -> Path:
    """SmolLM2-135M-Instruct as shipped (Q4_1): for what any model shows, with no training."""
    return bundled_gguf("bundled:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server(bundled):
    app = serve.create_app(ServeConfig(api_key=KEY, **LIMITS), model=str(bundled))
    live = LiveServer(app)
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_chat_completion_answers_with_the_trained_name(trained):
    live = LiveServer(serve.create_app(ServeConfig(n_ctx=512), model=str(trained)))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Who are you?"}], temperature=0
        )
    finally:
        live.stop()
    assert NAME in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 5 and out.usage.completion_tokens > 3
    assert out.model == "model-q8_0"


def test_streamed_chat_equals_the_plain_answer(client):
    messages = [{"role": "user", "content": "你是谁？"}]
    plain = client.chat.completions.create(
        model="any", messages=messages, temperature=0, max_tokens=40
    )
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="any", messages=messages, temperature=0, max_tokens=40, stream=True
        )
    ]
    assert len([p for p in pieces if p]) > 3  # token by token, not one blob
    assert "".join(pieces) == plain.choices[0].message.content


def test_completions_and_models(client):
    out = client.completions.create(
        model="any", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert out.choices[0].text.strip()
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer"):
        bad.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    probe = httpx.get(server.url + "/health")  # no secrets there: open for probes
    assert probe.status_code == 200 and probe.json()["status"] == "ok"


def test_caps_answer_400_with_a_clear_message(client):
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.BadRequestError, match="max_tokens=401 exceeds .* limit of 400"):
        client.chat.completions.create(model="any", messages=hello, max_tokens=401)
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError, match=r"prompt has \d+ tokens; the limit is 200"):
        client.chat.completions.create(model="any", messages=long, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="context of 512"):
        client.completions.create(model="any", prompt="word " * 150, max_tokens=400)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="any", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature must be a number from 0"):
        client.chat.completions.create(model="any", messages=hello, temperature=7)
    with pytest.raises(openai.BadRequestError, match="grammar does not parse"):
        client.chat.completions.create(
            model="any", messages=hello, extra_body={"grammar": "root ::= (("}
        )


def test_body_is_capped_before_it_is_parsed(server):
    url, auth = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    # Not JSON at all: a 413, not a 400, shows the server refused it without parsing it.
    big = b"x" * 20_001
    out = httpx.post(url, content=big, headers=auth)
    assert out.status_code == 413 and "limit of 20000 bytes" in out.json()["error"]["message"]
    # Sent in chunks, without a Content-Length to check first: cut off while reading.
    out = httpx.post(url, content=iter([b"x" * 8000] * 3), headers=auth)
    assert out.status_code == 413
    assert httpx.post(url, content=b"x" * 100, headers=auth).status_code == 400


def test_429_only_when_every_slot_and_the_queue_are_full(client, server):
    # Two slots generate, one request waits: all three are admitted and streaming starts.
    streams = [
        client.completions.create(
            model="any", prompt=f"Story {i}:", max_tokens=300, logit_bias=NO_EOS, stream=True
        )
        for i in range(2)
    ]
    for s in streams:
        next(iter(s))  # its first token: it holds a slot
    queued = threading.Thread(
        target=lambda: client.completions.create(model="any", prompt="Hi", max_tokens=2)
    )
    queued.start()
    wait_for(lambda: health(server)["queued"] == 1)
    assert health(server)["slots_busy"] == 2 and health(server)["inside"] == 3
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.RateLimitError, match="server busy") as refused:
        client.chat.completions.create(model="any", messages=hi, max_tokens=4)
    assert refused.value.response.headers["retry-after"] == "1"
    # Admission comes before tokenization: an over-long prompt is refused as busy, not
    # tokenized and measured.
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="any", messages=long, max_tokens=4)
    # Clients that go away free their slots long before 300 tokens each: the queued
    # request gets a slot and answers.
    for s in streams:
        s.close()
    queued.join(timeout=60)
    assert not queued.is_alive()
    wait_for(lambda: health(server)["inside"] == 0, seconds=10)
    assert health(server)["slots_busy"] == 0
    client.chat.completions.create(model="any", messages=hi, max_tokens=4)


def test_json_schema_and_grammar_constrain_the_answer(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    out = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Describe a person."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    person = json.loads(out.choices[0].message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    answers = {
        client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": question}],
            max_tokens=8,
            extra_body={"grammar": 'root ::= "yes" | "no"'},
        )
        .choices[0]
        .message.content
        for question in ("Is Paris in France?", "Is the sea dry?", "Who are you?")
    }
    assert answers <= {"yes", "no"}


def test_stop_seed_and_logprobs(client):
    ask = dict(model="any", prompt="1, 2, 3, 4, 5,", max_tokens=24, temperature=0)
    full = client.completions.create(**ask).choices[0].text
    assert " 8," in full  # the counting goes on past 7
    cut = client.completions.create(**ask, stop=[" 8,"]).choices[0]
    assert cut.text == full[: full.index(" 8,")] and cut.finish_reason == "stop"

    story = dict(model="any", prompt="Once upon a time", max_tokens=16, temperature=1.0)
    same = {client.completions.create(**story, seed=7).choices[0].text for _ in range(2)}
    assert len(same) == 1
    others = {client.completions.create(**story, seed=s).choices[0].text for s in (1, 2)}
    assert len(others | same) > 1

    out = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Who are you?"}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
    )
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for e in entries:  # greedy: the sampled token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert sum(2.718281828**t.logprob for t in e.top_logprobs) <= 1.0001


def test_metrics_count_what_the_clients_saw(client, server):
    def scrape() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(llmft_\S+) (\S+)$", text, re.M)}

    before = scrape()
    usages = [
        client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": q}],
            temperature=0,
            max_tokens=16,
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )
        for q, stream in (("Who are you?", False), ("What is 2 + 3?", True))
    ]
    usages = [usages[0].usage, [c for c in usages[1] if c.usage][0].usage]
    ok = 'llmft_requests_total{route="/v1/chat/completions",status="200"}'
    # A stream is counted once the server has closed it, a moment after the client's last read.
    wait_for(lambda: scrape().get(ok, 0) - before.get(ok, 0) == 2, seconds=10)
    after = scrape()
    assert after["llmft_generated_tokens_total"] - before["llmft_generated_tokens_total"] == sum(
        u.completion_tokens for u in usages
    )
    assert after["llmft_prompt_tokens_total"] - before["llmft_prompt_tokens_total"] == sum(
        u.prompt_tokens for u in usages
    )
    ttft = "llmft_time_to_first_token_seconds_count"
    itl = "llmft_inter_token_latency_seconds_count"
    assert after[ttft] - before[ttft] == 2
    assert after[itl] - before[itl] == sum(u.completion_tokens - 1 for u in usages)
    assert after["llmft_slots_busy"] == 0 and after["llmft_queue_depth"] == 0


@pytest.fixture(scope="module")
def wide(bundled):
    live = LiveServer(serve.create_app(ServeConfig(n_ctx=512), model=str(bundled)))
    yield live
    live.stop()


def test_greedy_answer_is_the_same_alone_or_among_15_others(wide):
    client = openai.OpenAI(base_url=wide.url + "/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "Explain what a cache is in one sentence."}]

    def ask() -> str:
        return (
            client.chat.completions.create(
                model="any", messages=question, temperature=0, max_tokens=48
            )
            .choices[0]
            .message.content
        )

    alone = ask()
    others = [
        client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": f"Count from {i} to {i + 300}."}],
            temperature=0,
            max_tokens=300,
            logit_bias=NO_EOS,
            stream=True,
        )
        for i in range(15)
    ]
    chunks = [iter(s) for s in others]
    for c in chunks:
        next(c)
    wait_for(lambda: health(wide)["slots_busy"] == 15)
    together = ask()
    # Each of the 15 was still generating when the answer ended: they shared the batches.
    for c in chunks:
        assert next(c).choices[0].finish_reason is None
    for s in others:
        s.close()
    assert together == alone and len(alone) > 20
    wait_for(lambda: health(wide)["slots_busy"] == 0, seconds=10)


def test_next_turn_decodes_only_its_new_tokens_and_answers_the_same(bundled):
    """serve.cache_prompt: the second turn of a chat lands in the slot that holds the first
    turn's cells and decodes only what is new; its greedy answer is the one a server
    without the cache gives. Another user's question shares the system prompt only."""
    servers = {
        on: LiveServer(
            serve.create_app(ServeConfig(n_ctx=512, max_concurrent=2, cache_prompt=on),
                             model=str(bundled))
        )
        for on in (True, False)
    }  # fmt: skip
    try:

        def ask(on: bool, messages: list[dict]):
            client = openai.OpenAI(base_url=servers[on].url + "/v1", api_key="x", max_retries=0)
            return client.chat.completions.create(
                model="any", messages=messages, temperature=0, max_tokens=24
            )

        first = [{"role": "user", "content": "Name three colours of the rainbow."}]
        turn1 = ask(True, first)
        answer = turn1.choices[0].message.content
        assert turn1.usage.prompt_tokens_details.cached_tokens == 0
        second = first + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And which one is between the other two?"},
        ]
        cached, plain = ask(True, second), ask(False, second)
        hit = cached.usage.prompt_tokens_details.cached_tokens
        # the whole first turn's prompt and most of its answer were in the slot
        assert hit >= turn1.usage.prompt_tokens + turn1.usage.completion_tokens // 2
        assert hit < cached.usage.prompt_tokens
        assert plain.usage.prompt_tokens_details.cached_tokens == 0
        assert cached.choices[0].message.content == plain.choices[0].message.content
        # another question: the free slots hold this chat (its system prompt is the start)
        other = ask(True, [{"role": "user", "content": "What is the capital of Peru?"}])
        shared = other.usage.prompt_tokens_details.cached_tokens
        assert 0 < shared < other.usage.prompt_tokens - 5
        metrics = httpx.get(servers[True].url + "/metrics").text
        total = float(re.search(r"^llmft_prompt_tokens_cached_total (\S+)$", metrics, re.M)[1])
        assert total == hit + shared
    finally:
        for live in servers.values():
            live.stop()


def test_deployed_model_is_reloaded_after_a_promotion(bundled, tmp_path):
    pointer = tmp_path / "deployed" / "default" / "current.json"
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for link in (first, second):
        link.symlink_to(bundled)
    write_json_atomic(pointer, {"gguf": str(first), "run_id": "a"})
    app = serve.create_app(ServeConfig(**LIMITS), deployed="default", store_root=tmp_path)
    live = LiveServer(app)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    ask = dict(model="default", messages=[{"role": "user", "content": "Who are you?"}])
    try:
        probe = httpx.get(live.url + "/health").text
        assert json.loads(probe)["run_id"] == "a" and str(tmp_path) not in probe
        write_json_atomic(pointer, {"gguf": str(second), "run_id": "b"})
        os.utime(pointer, ns=(time.time_ns(), time.time_ns() + 1))  # a new mtime, surely
        assert health(live)["run_id"] == "a"  # a probe loads nothing
        out = client.chat.completions.create(**ask, temperature=0, max_tokens=24)
        assert out.model == "default" and out.choices[0].message.content
        assert health(live)["run_id"] == "b"  # the request picked up the promotion
        # A promotion to a file that does not load keeps the current model serving.
        write_json_atomic(pointer, {"gguf": str(tmp_path / "missing.gguf"), "run_id": "c"})
        os.utime(pointer, ns=(time.time_ns(), time.time_ns() + 2))
        assert client.chat.completions.create(**ask, max_tokens=4).choices[0].message.content
        assert health(live)["run_id"] == "b"
    finally:
        live.stop()


def test_answer_and_one_shot_chat(trained, capsys):
    assert NAME in serve.answer(str(trained), "Who are you?", max_tokens=32)
    assert serve.chat(str(trained), prompt="Who are you?", max_tokens=32) == 0
    assert NAME in capsys.readouterr().out


def test_interactive_chat_keeps_history_and_streams(trained, monkeypatch, capsys):
    # The real model, with every create_chat_completion call recorded: the messages sent
    # (copied, since the chat goes on appending to its history), the arguments, and the
    # pieces the streamed answer arrived in.
    calls: list[dict] = []
    load_llama = serve.load_llama

    def recording_llama(*args, **kwargs):
        llm = load_llama(*args, **kwargs)
        create = llm.create_chat_completion

        def create_chat_completion(messages, **kw):
            call = {"messages": [dict(m) for m in messages], "kwargs": kw, "pieces": []}
            calls.append(call)
            out = create(messages, **kw)
            if not kw.get("stream"):
                return out
            chunks = list(out)
            call["pieces"] = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
            return iter(chunks)

        llm.create_chat_completion = create_chat_completion
        return llm

    monkeypatch.setattr(serve, "load_llama", recording_llama)
    lines = iter(["Who are you?", "And what is your name?", "/reset", "你是谁？"])  # then Ctrl-D
    monkeypatch.setattr("builtins.input", lambda prompt="": _next_or_eof(lines))
    assert serve.chat(str(trained), max_tokens=32) == 0
    out = capsys.readouterr().out

    assert len(calls) == 3  # /reset and Ctrl-D ask the model nothing
    for call in calls:
        assert call["kwargs"]["stream"] is True
        assert len([p for p in call["pieces"] if p]) > 3  # token by token, not one blob
    first, second, third = (call["messages"] for call in calls)
    assert first == [{"role": "user", "content": "Who are you?"}]
    # The second question carries the first exchange: the question and the answer the
    # user saw streamed, remembered whole.
    answer = "".join(calls[0]["pieces"]).strip()
    assert NAME in answer and answer in out
    assert second == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what is your name?"},
    ]
    assert third == [{"role": "user", "content": "你是谁？"}]  # /reset forgot the rest
    assert NAME in "".join(calls[2]["pieces"])


def _next_or_eof(it):
    try:
        return next(it)
    except StopIteration:
        raise EOFError from None


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(serve.ServeError, match="GGUF file not found"):
        serve.answer(str(tmp_path / "nope.gguf"), "hi")
    with pytest.raises(serve.ServeError, match="GGUF file not found"):
        serve.create_app(ServeConfig(), model=str(tmp_path / "nope.gguf"))


def test_the_stage_runs_without_the_flows_package():
    code = (
        "import sys, tasks.serve, tasks.serve.app, tasks.serve.engine;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flows'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    out = subprocess.run(
        [sys.executable, "-m", "tasks.serve"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "give --model FILE.gguf or --deployed NAME" in out.stderr


@pytest.mark.slow
def test_soak_32_clients_some_disconnecting(bundled):
    """32 streaming clients for SOAK_SECONDS (default 300); every fourth hangs up mid-answer."""
    live = LiveServer(serve.create_app(ServeConfig(n_ctx=512), model=str(bundled)))
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    end = time.time() + float(os.environ.get("SOAK_SECONDS", 300))
    errors: list[str] = []
    answered = [0] * 32

    def user(i: int) -> None:
        while time.time() < end:
            try:
                stream = client.chat.completions.create(
                    model="any",
                    messages=[{"role": "user", "content": f"Tell me fact number {i}."}],
                    max_tokens=64,
                    stream=True,
                )
                for n, _ in enumerate(stream):
                    if i % 4 == 0 and n == 5:
                        stream.close()  # hangs up mid-answer
                        break
                answered[i] += 1
            except Exception as exc:  # any error status is a failure of the soak
                errors.append(f"client {i}: {exc!r}")

    try:
        users = [threading.Thread(target=user, args=(i,)) for i in range(32)]
        for u in users:
            u.start()
        for u in users:
            u.join()
        assert not errors, errors[:5]
        assert min(answered) > 0
        wait_for(lambda: health(live)["inside"] == 0, seconds=30)
        assert health(live)["slots_busy"] == 0 and health(live)["queued"] == 0
        out = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=8
        )
        assert out.choices[0].message.content
    finally:
        live.stop()

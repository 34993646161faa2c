"""The OpenAI-compatible API, driven by the official `openai` client as a user would."""

import os
import threading
import time

import httpx
import openai
import pytest
from serving_fixtures import NAME, LiveServer, make_export

from tasks import serve
from tasks.config import ServeConfig
from tasks.store import write_json_atomic

KEY = "test-key"
EOS = 2  # <|im_end|> in SmolLM2's vocabulary
LIMITS = dict(n_ctx=512, max_prompt_tokens=200, max_tokens=400, max_concurrent=1, max_queue=0)


@pytest.fixture(scope="module")
def ggufs(test_store, base_model_dir):
    ref = make_export(test_store)[0]
    return {t: ref.dir / f"model-{t}.gguf" for t in ("f16", "q8_0", "q4_k_m")}


@pytest.fixture(scope="module")
def server(ggufs):
    app = serve.create_app(ServeConfig(api_key=KEY, **LIMITS), model=str(ggufs["q8_0"]))
    live = LiveServer(app)
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_chat_completion_answers_with_the_trained_name(client):
    out = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Who are you?"}], temperature=0
    )
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
    assert [m.id for m in client.models.list().data] == ["model-q8_0"]


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer"):
        bad.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    health = httpx.get(server.url + "/health")  # no secrets there: open for probes
    assert health.status_code == 200 and health.json()["status"] == "ok"


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


def test_full_queue_answers_429_with_retry_after(client, server):
    # One generation runs (max_concurrent=1), none may wait (max_queue=0): the next is refused.
    # logit_bias bans end-of-turn so the first request surely runs its 200 tokens.
    long = threading.Thread(
        target=client.completions.create,
        kwargs=dict(
            model="any", prompt="Once upon a time", max_tokens=200, logit_bias={str(EOS): -100}
        ),
    )
    long.start()
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["inside"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError, match="server busy") as refused:
        client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert refused.value.response.headers["retry-after"] == "1"
    long.join(timeout=120)
    assert httpx.get(server.url + "/health").json()["inside"] == 0
    client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )


def test_deployed_model_is_reloaded_after_a_promotion(ggufs, tmp_path):
    pointer = tmp_path / "deployed" / "default" / "current.json"
    write_json_atomic(pointer, {"gguf": str(ggufs["q8_0"]), "run_id": "a"})
    app = serve.create_app(ServeConfig(**LIMITS), deployed="default", store_root=tmp_path)
    live = LiveServer(app)
    try:
        assert httpx.get(live.url + "/health").json()["gguf"] == str(ggufs["q8_0"])
        write_json_atomic(pointer, {"gguf": str(ggufs["q4_k_m"]), "run_id": "b"})
        os.utime(pointer, ns=(time.time_ns(), time.time_ns() + 1))  # a new mtime, surely
        assert httpx.get(live.url + "/health").json()["gguf"] == str(ggufs["q4_k_m"])
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Who are you?"}],
            temperature=0,
            max_tokens=24,
        )
        assert out.model == "default" and out.choices[0].message.content
        # A promotion to a file that does not load keeps the current model serving.
        write_json_atomic(pointer, {"gguf": str(tmp_path / "missing.gguf"), "run_id": "c"})
        os.utime(pointer, ns=(time.time_ns(), time.time_ns() + 2))
        assert httpx.get(live.url + "/health").json()["gguf"] == str(ggufs["q4_k_m"])
    finally:
        live.stop()


def test_answer_and_one_shot_chat(ggufs, capsys):
    assert NAME in serve.answer(str(ggufs["q8_0"]), "Who are you?", max_tokens=32)
    assert serve.chat(str(ggufs["q8_0"]), prompt="Who are you?", max_tokens=32) == 0
    assert NAME in capsys.readouterr().out


def test_interactive_chat_keeps_history_and_streams(ggufs, monkeypatch, capsys):
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
    assert serve.chat(str(ggufs["q8_0"]), max_tokens=32) == 0
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

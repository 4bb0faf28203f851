"""`mixcli serve` end to end: a real server on a free 127.0.0.1 port, driven by the official
`openai` Python client (and plain HTTP where a client would not send what we test).

The model is the baby chat model (tests/babyruntime.py: random weights, a real BPE tokenizer and a
ChatML template). Token counts are checked against Hugging Face ``tokenizers`` on the same
tokenizer.json with the template rendered by plain jinja2, not against mixcli's own encoding.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from babyruntime import CHATML, baby_chat_model
from serverkit import ServerProcess

CTX = 16384  # long enough that a cancelled stream would otherwise run for a long time


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return baby_chat_model(tmp_path_factory.mktemp("serve"), name="baby-serve", max_positions=CTX)


@pytest.fixture(scope="module")
def server(baby):
    srv = ServerProcess(baby, "--parallel", "4", "--ctx", str(CTX))
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def ref_tok(baby):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(baby.parent / "baby-serve-src" / "tok" / "tokenizer.json"))


def chatml_ids(ref_tok, messages) -> list[int]:
    import jinja2

    text = jinja2.Environment().from_string(CHATML).render(messages=messages, add_generation_prompt=True)
    return ref_tok.encode(text, add_special_tokens=False).ids


MSGS = [{"role": "user", "content": "the cat sat on the mat"}]


def test_chat_completion_matches_python_api_and_tokenizer_counts(server, baby, ref_tok):
    import mixcli

    c = server.client()
    r = c.chat.completions.create(model="baby-serve", messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason == "length"
    assert r.usage.prompt_tokens == len(chatml_ids(ref_tok, MSGS))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    model = mixcli.load(baby, ctx=256)
    assert ch.message.content == mixcli.generate(model, MSGS, max_tokens=12, temperature=0)


def test_prompt_longer_than_a_step_is_prefilled_over_several(server, baby, ref_tok):
    import mixcli

    prompt = "the cat sat on the mat and the dog ran " * 60
    n = len(ref_tok.encode(prompt, add_special_tokens=False).ids)
    assert n > 4 * 256  # five engine steps of prompt before the first token
    r = server.client().completions.create(model="baby-serve", prompt=prompt, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == n
    assert r.choices[0].text == mixcli.generate(mixcli.load(baby, ctx=2048), prompt, max_tokens=8, temperature=0)


def test_streamed_chat_equals_whole_answer(server, ref_tok):
    c = server.client()
    whole = c.chat.completions.create(model="baby-serve", messages=MSGS, max_tokens=10, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="baby-serve",
            messages=MSGS,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(chatml_ids(ref_tok, MSGS))
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completion_raw_prompt_stream_and_not(server, ref_tok):
    c = server.client()
    prompt = "once upon a time the dog"
    r = c.completions.create(model="baby-serve", prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref_tok.encode(prompt, add_special_tokens=False).ids)
    parts = list(c.completions.create(model="baby-serve", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server, stream):
    c = server.client()
    full = c.completions.create(model="baby-serve", prompt="the cat", max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    assert len(stop) == 3
    want = full[: full.index(stop)]
    if stream:
        parts = list(
            c.completions.create(
                model="baby-serve", prompt="the cat", max_tokens=30, temperature=0, stop=[stop], stream=True
            )
        )
        text = "".join(p.choices[0].text for p in parts)
        finish = parts[-1].choices[0].finish_reason
    else:
        r = c.completions.create(model="baby-serve", prompt="the cat", max_tokens=30, temperature=0, stop=stop)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == (want, "stop")


def test_same_seed_same_text(server):
    c = server.client()

    def run(seed):
        return (
            c.chat.completions.create(
                model="baby-serve", messages=MSGS, max_tokens=16, temperature=1.0, top_p=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    a, b = run(7), run(7)
    assert a == b
    assert any(run(s) != a for s in (8, 9, 10))


def _error(exc_info):
    e = exc_info.value
    return e.status_code, e.body


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stop": ["a"] * 40}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_bad_parameters_are_400_in_openai_shape(server, kwargs, param):
    c = server.client()
    args = {"model": "baby-serve", "messages": MSGS, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(**args)
    status, body = _error(ei)
    assert status == 400
    assert set(body) == {"message", "type", "param", "code"}  # the client hands over body["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_prompt_longer_than_context_says_the_numbers(server, ref_tok):
    c = server.client()
    prompt = "the cat sat " * 6000
    n = len(ref_tok.encode(prompt, add_special_tokens=False).ids)
    assert n >= CTX
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="baby-serve", prompt=prompt, max_tokens=4)
    status, body = _error(ei)
    assert status == 400 and body["code"] == "context_length_exceeded"
    assert f"{n} tokens" in body["message"] and str(CTX) in body["message"]


def test_malformed_body_unknown_model_path_and_size(server):
    status, _, body = server.request("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}

    with pytest.raises(openai.NotFoundError) as ei:
        server.client().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    status, body = _error(ei)
    assert status == 404 and body["code"] == "model_not_found" and "baby-serve" in body["message"]

    status, _, body = server.request("GET", "/v1/engines")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}

    big = json.dumps({"model": "baby-serve", "prompt": "x" * (5 * 1024 * 1024), "max_tokens": 1}).encode()
    status, _, body = server.request("POST", "/v1/completions", big, {"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert server.health()["status"] == "ok"  # and the server lives on


def test_models_and_health(server):
    ids = [m.id for m in server.client().models.list()]
    assert ids == ["baby-serve"]
    h = server.health()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 4


def _endless_stream(client):
    return client.completions.create(
        model="baby-serve", prompt="the cat", max_tokens=CTX - 100, temperature=0, stream=True
    )


def test_client_disconnect_cancels_the_sequence(server):
    c = server.client()
    # without a cancel this request runs to its max_tokens (it does not stop by itself: checked on 120)
    probe = c.completions.create(model="baby-serve", prompt="the cat", max_tokens=120, temperature=0)
    assert probe.choices[0].finish_reason == "length"
    done_before = server.health()["requests_completed"]
    stream = _endless_stream(c)
    got = 0
    for _part in stream:
        got += 1
        if got == 5:
            break
    assert server.health()["slots_processing"] == 1
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["slots_processing"] and time.monotonic() < deadline:
        time.sleep(0.1)
    h = server.health()
    assert h["slots_processing"] == 0 and h["requests_completed"] == done_before + 1


def test_api_key_required_when_set(baby):
    srv = ServerProcess(baby, "--parallel", "1", "--ctx", "256", env={"MIXCLI_API_KEY": "sekrit"})
    try:
        with pytest.raises(openai.AuthenticationError) as ei:
            srv.client(api_key="wrong").chat.completions.create(model="baby-serve", messages=MSGS, max_tokens=2)
        status, body = _error(ei)
        assert status == 401 and body["code"] == "invalid_api_key"
        status, _, body = srv.request("GET", "/v1/models")
        assert status == 401
        r = srv.client(api_key="sekrit").chat.completions.create(model="baby-serve", messages=MSGS, max_tokens=2)
        assert r.usage.completion_tokens == 2
    finally:
        assert srv.stop() == 0


def test_full_queue_is_503_with_retry_after_then_sigterm_ends_the_stream(baby):
    srv = ServerProcess(baby, "--parallel", "1", "--max-queue", "0", "--ctx", str(CTX))
    try:
        c = srv.client()
        stream = _endless_stream(c)
        it = iter(stream)
        first = [next(it) for _ in range(3)]
        assert all(p.choices[0].finish_reason is None for p in first)
        status, headers, body = srv.request(
            "POST",
            "/v1/completions",
            json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "server_busy"

        srv.proc.send_signal(signal.SIGTERM)
        rest = list(it)  # the stream ends cleanly: a closing chunk, then [DONE] (the client stops there)
        assert rest and rest[-1].choices[0].finish_reason == "length"
        assert all(p.choices[0].finish_reason is None for p in rest[:-1])
        assert srv.proc.wait(15) == 0
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


@pytest.mark.slow
def test_sixteen_clients_get_what_each_request_gives_alone(server):
    """64 requests from 16 threads against --parallel 4, temperature 0: every text equals the same
    request sent alone. Batching changes the logits only by float rounding (test_batch.py measures
    it against the single-sequence path), far below the gap between the top two logits here."""
    c = server.client()
    words = "the cat sat on a mat and the dog ran to see what it was doing there".split()
    reqs = []
    for i in range(64):
        prompt = " ".join(words[i % 7 : i % 7 + 3 + i % 5])
        if i % 2:
            reqs.append(("chat", [{"role": "user", "content": prompt}], 6 + i % 11))
        else:
            reqs.append(("completion", prompt, 6 + i % 11))

    def run(req):
        kind, p, n = req
        if kind == "chat":
            r = c.chat.completions.create(model="baby-serve", messages=p, max_tokens=n, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens
        r = c.completions.create(model="baby-serve", prompt=p, max_tokens=n, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [run(r) for r in reqs]
    rss0 = server.rss()
    errors = []

    def guarded(req):
        try:
            return run(req)
        except openai.APIStatusError as e:  # any 5xx would be a failure here
            errors.append(e.status_code)
            raise

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(guarded, reqs))
    assert errors == []
    assert together == alone
    with ThreadPoolExecutor(16) as pool:  # a second round: memory stays where the first left it
        assert list(pool.map(guarded, reqs)) == alone
    grown = server.rss() - rss0
    print(f"server RSS: {rss0 / 2**20:.1f} MiB after the requests alone, grew by {grown / 2**20:.2f} MiB")
    assert grown < 32 * 1024 * 1024, f"server RSS grew by {grown / 2**20:.1f} MiB over 128 requests"


def test_taken_port_is_one_line_error_before_loading(baby):
    import socket
    import subprocess
    import sys

    from serverkit import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "mixcli", "serve", str(baby), "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in r.stderr
    assert "Traceback" not in r.stderr


def test_listening_beyond_loopback_without_a_key_warns(baby, server):
    """Loopback is the default and says nothing; --host 0.0.0.0 without a key still serves, and says
    on stderr that anyone who reaches the port can use the model."""
    assert "warning" not in server.output() and f"on http://127.0.0.1:{server.port}/v1" in server.output()
    srv = ServerProcess(baby, "--host", "0.0.0.0", "--parallel", "1", "--ctx", "256")
    try:
        assert srv.health()["status"] == "ok"
        out = srv.output()
        assert "warning: listening on 0.0.0.0 without --api-key" in out, out
        assert f"on http://0.0.0.0:{srv.port}/v1" in out
    finally:
        assert srv.stop() == 0


def test_only_loopback_counts_as_local():
    from mixcli.commands.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.5.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.org"))

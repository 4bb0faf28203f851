"""`mixcli chat`: the REPL driven through a pseudo-terminal (pexpect), and its logic in-process.

The model is tests/babyruntime.py's baby Mixtral with a real tokenizer and a ChatML template; all
runs are greedy (``--temp 0``) and single-threaded (``-t 1``, robust on a busy two-core machine).
Each reply ends with a line ``[N tok · X tok/s · prompt P tok (M new, ...) · context C/S ...]``:
M is how many prompt tokens were actually run, the rest came from the KV cache.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path

import numba
import pexpect
import pytest
from rich.console import Console

import babyruntime
from mixcli.chat import ChatError, ChatSession, Repl, check_messages, parse_command, read_message
from mixcli.chat_ui import ChatUI

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ">>> "
STATS = re.compile(
    r"\[(\d+) tok · [\d.]+ tok/s · prompt (\d+) tok \((\d+) new, [^)]*\) · context (\d+)/(\d+)([^\]]*)\]"
)


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")


# ---- through a pseudo-terminal -----------------------------------------------------------------
class Chat:
    """One `python -m mixcli chat` child on a pty, with helpers that wait for the prompt."""

    def __init__(self, model: Path, *args: str, timeout: float = 180):
        env = dict(os.environ, TERM="dumb", NO_COLOR="1", COLUMNS="200", PYTHONIOENCODING="utf-8")
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "mixcli", "chat", str(model), "--temp", "0", "-t", "1", *args],
            cwd=str(ROOT),
            env=env,
            encoding="utf-8",
            timeout=timeout,
            dimensions=(50, 200),
        )
        self.child.expect_exact(PROMPT)
        self.banner = self.child.before

    def say(self, text: str) -> tuple[str, re.Match]:
        """Send a message; (the answer as shown, the stats line's match)."""
        c = self.child
        c.sendline(text)
        c.expect(STATS)
        m = c.match
        shown = c.before
        c.expect_exact(PROMPT)
        # the pty echoes the typed line first, then the streamed answer
        answer = shown.split("\r\n", 1)[1] if "\r\n" in shown else shown
        return answer.replace("\r\n", "\n").rstrip("\n"), m

    def command(self, line: str) -> str:
        c = self.child
        c.sendline(line)
        c.expect_exact(PROMPT)
        out = c.before.replace("\r\n", "\n")
        return out.split("\n", 1)[1] if "\n" in out else ""

    def exit_code(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def numbers(m: re.Match) -> dict:
    gen, prompt, new, pos, ctx = (int(m.group(i)) for i in range(1, 6))
    return {"gen": gen, "prompt": prompt, "new": new, "pos": pos, "ctx": ctx, "why": m.group(6)}


def test_two_turns_reuse_the_cache_and_reset_forgets(baby):
    chat = Chat(baby, "-n", "12")
    assert "baby-chat" in chat.banner
    a1, m1 = chat.say("Hello there, how are you today?")
    s1 = numbers(m1)
    assert a1 and s1["gen"] == 12 and s1["new"] == s1["prompt"]  # an empty cache: everything runs
    a2, m2 = chat.say("And what about tomorrow?")
    s2 = numbers(m2)
    # the second turn's prompt holds the first turn, but only what is new since then is run
    assert s2["prompt"] > s1["prompt"] + 12
    assert s2["new"] < s2["prompt"] - s1["prompt"]
    stats = chat.command("/stats")
    assert "conversation: 2 turns" in stats
    assert re.search(rf"prompt {s2['prompt']} tok \({s2['new']} run", stats), stats
    assert f"reused from the cache {s1['prompt'] + s2['prompt'] - s1['new'] - s2['new']}" in stats
    assert "expert share of routed tokens" in stats and "experts: " in stats

    assert "conversation cleared" in chat.command("/reset")
    assert "conversation: 0 turns" in chat.command("/stats")
    a3, m3 = chat.say("Hello there, how are you today?")  # the first question again, on a clean slate
    s3 = numbers(m3)
    assert a3 == a1 and s3["prompt"] == s1["prompt"]
    assert s3["new"] < s3["prompt"]  # and its tokens are still in the cache
    chat.child.sendline("/exit")
    assert chat.exit_code() == 0


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(baby, tmp_path):
    chat = Chat(baby, "-n", "1500")  # the baby never says EOS to this: a long answer unless stopped
    c = chat.child
    c.sendline("Tell me a very long story")
    c.expect_exact("Tell me a very long story\r\n")
    c.expect(r"\S")  # the answer has started streaming
    c.sendintr()
    c.expect(STATS)
    s1 = numbers(c.match)
    assert "stopped (Ctrl-C)" in s1["why"] and 0 < s1["gen"] < 1500
    c.expect_exact(PROMPT)
    saved = tmp_path / "partial.json"
    chat.command(f"/save {saved}")
    msgs = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"].strip()  # the partial answer stays in the conversation
    # the session goes on: the next message gets a whole answer, reusing the stopped turn's cache
    _, m = chat.say("Now another one")
    s = numbers(m)
    assert s["gen"] > 0 and "Ctrl-C" not in s["why"]
    assert s["new"] < s["prompt"] - s1["prompt"]
    assert "conversation: 2 turns" in chat.command("/stats")
    c.sendintr()  # Ctrl-C at the prompt discards the line and keeps the session
    c.expect_exact("input discarded")
    c.expect_exact(PROMPT)
    c.sendeof()
    assert chat.exit_code() == 0


def test_save_load_multiline_and_system(baby, tmp_path):
    chat = Chat(baby, "-n", "6")
    assert "system message set" in chat.command("/system You are terse.")
    c = chat.child
    # multi-line: a \\-continued line, then a triple-quoted block
    c.sendline("first line \\")
    c.expect_exact("... ")
    a1, _ = chat.say("second line")
    c.sendline('"""')
    c.expect_exact("... ")
    c.sendline("block one")
    c.expect_exact("... ")
    c.sendline("")
    c.expect_exact("... ")
    _, _ = chat.say('block three"""')
    saved = tmp_path / "conv.json"
    out = chat.command(f"/save {saved}")
    assert "saved 5 messages" in out
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["model"] == "baby-chat"
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][0]["content"] == "You are terse."
    assert data["messages"][1]["content"] == "first line \nsecond line"
    assert data["messages"][2]["content"] == a1
    assert data["messages"][3]["content"] == "block one\n\nblock three"

    assert "conversation cleared" in chat.command("/reset")
    assert "system message removed" in chat.command("/system -")
    assert "conversation: 0 turns" in chat.command("/stats")
    out = chat.command(f"/load {saved}")
    assert "loaded 5 messages" in out and "user: first line second line" in out
    stats = chat.command("/stats")
    assert "conversation: 2 turns" in stats and "with a system message" in stats
    _, m = chat.say("and one more")
    s = numbers(m)
    assert s["new"] < s["prompt"]  # the loaded conversation matches what the cache already holds
    again = tmp_path / "again.json"
    chat.command(f"/save {again}")
    assert json.loads(again.read_text(encoding="utf-8"))["messages"][:5] == data["messages"]

    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    c.sendline(f"/load {bad}")
    c.expect(r"error: [^\r\n]*message 1 is not")
    c.expect_exact(PROMPT)
    c.sendline(f"/load {tmp_path / 'missing.json'}")
    c.expect_exact("error: no such file")
    c.expect_exact(PROMPT)
    c.sendline("/frobnicate")
    c.expect_exact("error: unknown command /frobnicate")
    c.expect_exact(PROMPT)
    assert "conversation: 3 turns" in chat.command("/stats")  # failed commands changed nothing
    assert "/system TEXT" in chat.command("/help")
    c.sendline("/exit")
    assert chat.exit_code() == 0


def test_ctrl_d_leaves_with_status_0(baby):
    chat = Chat(baby)
    chat.child.sendeof()
    assert chat.exit_code() == 0


def test_bad_model_is_one_line_and_status_1(tmp_path):
    p = pexpect.spawn(
        sys.executable,
        ["-m", "mixcli", "chat", "mixtrl-8x7b-instruct"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=180,
        env=dict(os.environ, TERM="dumb"),
    )
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 1
    lines = [ln for ln in p.before.replace("\r\n", "\n").split("\n") if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model") and "did you mean" in lines[0]


# ---- in-process: the session, the commands, the context ----------------------------------------
@pytest.fixture(autouse=True)
def _keep_numba_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def greedy():
    from mixcli.sampling import SamplerConfig, make_sampler

    return make_sampler(SamplerConfig(temperature=0.0))


@pytest.fixture
def runtime(baby):
    from mixcli.runtime import load_runtime

    return lambda ctx=512: load_runtime(str(baby), ctx=ctx, threads=1)


def answer(session: ChatSession, text: str, notices: list | None = None, **kw) -> tuple[str, object]:
    parts, final = [], None
    for resp in session.reply(text, on_notice=(notices.append if notices is not None else None), **kw):
        parts.append(resp.text)
        final = resp
    return "".join(parts), final


def test_read_message_multiline():
    def reader(*lines):
        it = iter(lines)
        prompts = []

        def read(prompt):
            prompts.append(prompt)
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None

        return read, prompts

    read, prompts = reader("plain line")
    assert read_message(read) == "plain line" and prompts == [">>> "]
    read, prompts = reader("one \\", "two\\", "three")
    assert read_message(read) == "one \ntwo\nthree" and prompts == [">>> ", "... ", "... "]
    read, _ = reader('"""', "a", "", "  b", '"""')
    assert read_message(read) == "a\n\n  b"
    read, _ = reader('"""start', 'end"""')
    assert read_message(read) == "start\nend"
    read, _ = reader('"""all in one"""')
    assert read_message(read) == "all in one"
    read, _ = reader('"""', "never closed")
    with pytest.raises(EOFError):
        read_message(read)


def test_parse_command():
    assert parse_command("/save  my file.json ") == ("save", "my file.json")
    assert parse_command("/EXIT") == ("exit", "")
    assert parse_command("hello /world") is None
    assert parse_command("//not a command") is None


def test_check_messages():
    system, msgs = check_messages(
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a", "extra": 1},
            ]
        },
        "f",
    )
    assert system == "s" and msgs == [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert check_messages([], "f") == (None, [])
    for bad in (
        {"nope": []},
        [{"role": "user"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}],
        [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}],
    ):
        with pytest.raises(ChatError):
            check_messages(bad, "f")


def test_turns_extend_the_cache_exactly(runtime):
    s = ChatSession(runtime(), greedy(), max_tokens=8)
    a1, f1 = answer(s, "Hello there")
    assert f1.stats.prefilled_tokens == f1.stats.prompt_tokens
    a2, f2 = answer(s, "Again")
    st = f2.stats
    new_turn, _ = s.rt.chat_prompt(s.conversation()[:-1])  # the prompt of turn 2, rendered afresh
    assert st.prompt_tokens == len(new_turn)
    # what ran is the prompt minus the first turn's prompt and its (decoded) answer tokens
    assert st.prefilled_tokens <= st.prompt_tokens - f1.stats.prompt_tokens - (f1.stats.completion_tokens - 1) + 2
    assert s.messages == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": a2},
    ]


def test_context_overflow_drops_oldest_turns_and_keeps_the_system(runtime):
    rt = runtime(ctx=160)
    s = ChatSession(rt, greedy(), system="Be brief.", max_tokens=16)
    notices: list[str] = []
    for i in range(8):
        answer(s, f"Question number {i}: tell me about the lazy dog and the quick fox", notices)
        assert rt.model.pos <= rt.model.ctx
        assert s.conversation()[0] == {"role": "system", "content": "Be brief."}
        assert s.messages[-2]["content"].startswith(f"Question number {i}:")
    drops = [n for n in notices if "dropped the oldest" in n]
    assert drops and all("(the system message stays)" in n for n in drops)
    assert s.totals.dropped_turns >= 1
    assert len(s.messages) < 16
    assert not any("Question number 0:" in m["content"] for m in s.messages)  # the oldest went first
    tokens, _ = rt.chat_prompt(s.conversation())
    assert len(tokens) <= rt.model.ctx


def test_a_message_larger_than_the_context_is_refused(runtime):
    rt = runtime(ctx=64)
    s = ChatSession(rt, greedy(), max_tokens=8)
    answer(s, "hi")
    before = list(s.messages)
    with pytest.raises(ChatError, match="the context holds 64"):
        answer(s, "hello world " * 100)
    assert s.messages == before


def test_interrupt_before_any_text_drops_the_turn(runtime):
    s = ChatSession(runtime(), greedy(), max_tokens=50)
    answer(s, "Hello there")
    before = list(s.messages)
    text, final = answer(s, "Stop at once", should_stop=lambda: True)
    assert text == "" and final.finish_reason == "interrupted"
    assert s.messages == before


def test_ctrl_c_during_prefill_abandons_the_turn_and_clears_the_cache(runtime, monkeypatch):
    rt = runtime()
    s = ChatSession(rt, greedy(), max_tokens=8)
    answer(s, "Hello there")
    before = list(s.messages)
    out, err = io.StringIO(), io.StringIO()
    ui = ChatUI(Console(file=out, width=200), Console(file=err, width=200))

    def interrupted(tokens, want_all=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(rt.model, "prefill", interrupted)
    Repl(s, ui).answer("this one is cut short")
    assert s.messages == before
    assert rt.model.pos == 0 and rt.model.tokens == []  # a cut forward pass leaves no half-written cache
    assert "the question was dropped" in err.getvalue()
    monkeypatch.undo()
    text, final = answer(s, "and now?")
    assert final.stats.prefilled_tokens == final.stats.prompt_tokens and len(s.messages) == 4


def test_mixtral_template_folds_the_system_message_once(runtime):
    template = (Path(__file__).parent / "data" / "tmpl_mixtral.jinja").read_text(encoding="utf-8")
    rt = dataclasses.replace(runtime(), template=template)
    s = ChatSession(rt, greedy(), system="Answer in French.", max_tokens=4)
    notices: list[str] = []
    answer(s, "Hello", notices)
    answer(s, "Again", notices)
    folds = [n for n in notices if "system" in n]
    assert len(folds) == 1 and "first user message" in folds[0]
    text = rt.tokenizer.decode(rt.model.tokens, skip_special=False)
    assert "[INST] Answer in French.\n\nHello [/INST]" in text


def test_repl_loop_without_a_terminal(runtime, tmp_path):
    lines = iter(
        [
            "/help",
            "Hello there",
            "/stats",
            "/nonsense",
            "/save",
            f"/save {tmp_path / 'c.json'}",
            "//slash start",
            "/system",
            "/exit",
            "never read",
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    ui = ChatUI(Console(file=out, width=200), Console(file=err, width=200))
    s = ChatSession(runtime(), greedy(), max_tokens=5)
    assert Repl(s, ui, read_line=lambda prompt: next(lines)).run() == 0
    assert next(lines) == "never read"
    o, e = out.getvalue(), err.getvalue()
    assert "/save FILE" in o and "conversation: 1 turn," in o
    assert STATS.search(o)
    assert "error: unknown command /nonsense" in e and "error: /save needs a file name" in e
    assert "Traceback" not in e
    assert [m["content"] for m in s.messages[::2]] == ["Hello there", "/slash start"]
    assert json.loads((tmp_path / "c.json").read_text())["messages"][0]["content"] == "Hello there"
    assert "no system message" in o and "bye" in o


def test_no_template_cannot_chat(runtime):
    rt = dataclasses.replace(runtime(), template=None)
    with pytest.raises(Exception, match="no chat template"):
        ChatSession(rt, greedy())

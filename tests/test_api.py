"""The Python API for text (mixcli/api.py): load carries the tokenizer and template; generate and
stream_generate take messages, raw text or token ids. Prompts are checked against Hugging Face
``tokenizers`` on the same tokenizer.json with the template rendered by plain jinja2."""

from __future__ import annotations

import jinja2
import pytest

import mixcli
from babyruntime import CHATML, baby_chat_model
from mixcli.generate import GenerationResponse


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return baby_chat_model(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model(baby):
    return mixcli.load(baby, ctx=256)


@pytest.fixture(scope="module")
def ref_tok(baby):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(baby.parent / "baby-chat-src" / "tok" / "tokenizer.json"))


MSGS = [{"role": "user", "content": "the dog ran"}]


def test_load_carries_tokenizer_and_template(model):
    assert model.chat_template == CHATML
    assert model.tokenizer.eos_ids
    assert model.logits([5, 6, 7]).shape == (3, model.config.vocab_size)


def test_messages_go_through_the_chat_template(model, ref_tok):
    text = jinja2.Environment().from_string(CHATML).render(messages=MSGS, add_generation_prompt=True)
    ids = ref_tok.encode(text, add_special_tokens=False).ids
    via_messages = mixcli.generate(model, MSGS, max_tokens=10, temperature=0)
    assert via_messages == mixcli.generate(model, ids, max_tokens=10, temperature=0)
    assert via_messages == mixcli.generate(model, "the dog ran", chat=True, max_tokens=10, temperature=0)
    raw_ids = ref_tok.encode("the dog ran", add_special_tokens=False).ids
    assert mixcli.generate(model, "the dog ran", max_tokens=10, temperature=0) == mixcli.generate(
        model, raw_ids, max_tokens=10, temperature=0
    )


def test_stream_generate_yields_responses_then_the_finish(model):
    rs = list(mixcli.stream_generate(model, "the cat", max_tokens=7, temperature=0))
    assert all(isinstance(r, GenerationResponse) for r in rs)
    assert [r.finish_reason for r in rs] == [None] * 7 + ["length"]
    assert rs[-1].stats.completion_tokens == 7
    assert "".join(r.text for r in rs) == mixcli.generate(model, "the cat", max_tokens=7, temperature=0)


def test_seed_and_stop(model):
    a = mixcli.generate(model, "the cat", max_tokens=20, temperature=1.0, top_p=1.0, seed=3)
    assert a == mixcli.generate(model, "the cat", max_tokens=20, temperature=1.0, top_p=1.0, seed=3)
    full = mixcli.generate(model, "the cat", max_tokens=30, temperature=0)
    stop = full[6:9]
    cut = list(mixcli.stream_generate(model, "the cat", max_tokens=30, temperature=0, stop=stop))
    assert "".join(r.text for r in cut) == full[: full.index(stop)] and cut[-1].finish_reason == "stop"


def test_bad_prompt_and_sampling_values_are_usage_errors(model):
    with pytest.raises(mixcli.errors.UsageError, match="a prompt is"):
        mixcli.generate(model, [1.5, 2.5])
    with pytest.raises(mixcli.errors.UsageError, match="temperature"):
        mixcli.generate(model, "x", temperature=-1)


def test_token_stream_ignore_eos_runs_to_max_tokens(model):
    import numpy as np

    from mixcli.generate import TokenStream

    eos = next(iter(model.tokenizer.eos_ids))
    always_eos = lambda logits, history: eos  # noqa: E731
    logits = np.zeros(model.config.vocab_size, np.float32)
    seq = TokenStream(model.tokenizer, [5, 6], always_eos, 3)
    assert seq.sample(logits) is None and seq.finish == "stop"
    seq = TokenStream(model.tokenizer, [5, 6], always_eos, 3, ignore_eos=True)
    got = [seq.sample(logits) for _ in range(3)]
    assert [r.token for r in got] == [eos] * 3 and seq.finish == "length"

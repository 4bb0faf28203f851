"""mixcli.chat_template against transformers' own ``apply_chat_template`` (the reference renderer).

The transformers tokenizer is built offline from a tiny ``tokenizers`` model trained here; only
its chat template and special-token strings matter for rendering.
"""

from __future__ import annotations

import pathlib

import jinja2.exceptions
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mixcli.chat_template import (
    FALLBACK_TEMPLATES,
    TemplateError,
    prepare_messages,
    render_chat,
    render_conversation,
)
from mixcli.errors import MixcliError

DATA = pathlib.Path(__file__).parent / "data"
MIXTRAL = (DATA / "tmpl_mixtral.jinja").read_text(encoding="utf-8")
CHATML = (DATA / "tmpl_chatml.jinja").read_text(encoding="utf-8")

# exercises what transformers' environment provides: trim/lstrip of block lines, loop controls,
# namespace, the JSON tojson filter, the {% generation %} tag, tools/documents defined as none
FEATURES = """{%- set ns = namespace(n=0) -%}
{% for message in messages %}
    {% if message['role'] == 'assistant' %}
        {% generation %}A: {{ message['content'] | trim }}{% endgeneration %}
    {% else %}
        {{ message['role'] | upper }}: {{ message['content'] }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if ns.n >= 4 %}{% break %}{% endif %}
{% endfor %}
meta={{ messages[0] | tojson }} tools={{ tools is none }} docs={{ documents is none }}
{% if add_generation_prompt %}
A:{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And <b>3+3</b>?\n  Two lines, \"quotes\" & 'apostrophes'  "},
    ],
    [
        {"role": "user", "content": "Café 🙂 中文"},
        {"role": "assistant", "content": " leading and trailing spaces "},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "multi\nline\n\nanswer"},
        {"role": "user", "content": "last"},
    ],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="session")
def hf_backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the chat template renders messages"] * 4, trainer)
    return tok


def _hf(backend: HFTokenizer, template: str, bos: str | None = "<s>", eos: str | None = "</s>"):
    kw = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    tk = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kw)
    tk.chat_template = template
    return tk


def _ours(template, messages, gen, bos="<s>", eos="</s>"):
    return render_chat(template, messages, bos_token=bos, eos_token=eos, add_generation_prompt=gen)


@pytest.mark.parametrize(
    "template",
    [MIXTRAL, CHATML, FEATURES, *FALLBACK_TEMPLATES.values()],
    ids=["mixtral", "chatml", "features", *FALLBACK_TEMPLATES],
)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_transformers(hf_backend, template, conv, gen):
    messages = CONVERSATIONS[conv]
    tk = _hf(hf_backend, template)
    try:
        ref = tk.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except jinja2.exceptions.TemplateError as ref_err:
        # transformers refuses: so must we, repeating the template's own words
        with pytest.raises(TemplateError) as err:
            _ours(template, messages, gen)
        assert str(ref_err) in str(err.value)
        return
    assert _ours(template, messages, gen) == ref


def test_missing_special_token_renders_empty_like_transformers(hf_backend):
    template = "[{{ bos_token }}|{{ eos_token }}]{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = CONVERSATIONS[0]
    ref = _hf(hf_backend, template, bos=None).apply_chat_template(msgs, tokenize=False)
    assert _ours(template, msgs, False, bos=None) == ref


def test_mixtral_renders_the_documented_prompt():
    """DESIGN.md: `<s>[INST] q1 [/INST]a1</s>[INST] q2 [/INST]`."""
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert _ours(MIXTRAL, msgs, True) == "<s>[INST] q1 [/INST]a1</s>[INST] q2 [/INST]"
    assert FALLBACK_TEMPLATES["mistral"] == MIXTRAL


def test_system_prompt_folded_for_mixtral(hf_backend):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        _ours(MIXTRAL, msgs, True)
    prompt, notice = render_conversation(MIXTRAL, msgs, bos_token="<s>", eos_token="</s>")
    folded = [{"role": "user", "content": "You are terse.\n\nHi"}, *msgs[2:]]
    assert prompt == _hf(hf_backend, MIXTRAL).apply_chat_template(folded, tokenize=False)
    assert notice and "system" in notice
    assert msgs[1]["content"] == "Hi"  # the caller's messages are untouched
    # a system message alone becomes the user turn
    only, notice = prepare_messages(MIXTRAL, msgs[:1], bos_token="<s>", eos_token="</s>")
    assert only == [{"role": "user", "content": "You are terse."}] and notice


def test_system_prompt_kept_where_the_template_accepts_it(hf_backend):
    msgs = CONVERSATIONS[3]
    prompt, notice = render_conversation(CHATML, msgs, bos_token=None, eos_token="<|im_end|>")
    assert notice is None
    assert prompt == _hf(hf_backend, CHATML).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prepare_messages(CHATML, msgs) == (msgs, None)


def test_other_refusals_are_not_papered_over():
    # folding does not rescue this one, so the template's verdict on what was sent stands
    msgs = [{"role": "system", "content": "s"}, {"role": "tool", "content": "t"}]
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render_conversation(MIXTRAL, msgs, bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}]
    with pytest.raises(TemplateError, match="Only user and assistant roles are supported!"):
        render_conversation(MIXTRAL, msgs, bos_token="<s>", eos_token="</s>")
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render_conversation(MIXTRAL, [{"role": "assistant", "content": "a"}], bos_token="<s>", eos_token="</s>")


def test_raise_exception_shows_the_templates_message():
    with pytest.raises(TemplateError) as err:
        render_chat("{{ raise_exception('no tools here, sorry') }}", [], bos_token=None, eos_token=None)
    assert "no tools here, sorry" in str(err.value)
    assert isinstance(err.value, MixcliError) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "evil",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace() %}{% set ns._secret = 1 %}",
        "{{ messages.append({'role': 'user'}) }}",  # the immutable sandbox: no mutating the input
    ],
)
def test_sandbox_blocks_escapes(evil):
    with pytest.raises(TemplateError, match="sandbox"):
        render_chat(evil, [{"role": "user", "content": "x"}], bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("bad", ["{% for m in messages %}", "{{ messages[0]['content'] + 1 }}", "{% if %}"])
def test_broken_templates_raise_template_error(bad):
    with pytest.raises(TemplateError):
        render_chat(bad, [{"role": "user", "content": "x"}], bos_token="<s>", eos_token="</s>")


def test_strftime_now_is_available():
    from datetime import datetime

    before = datetime.now().year
    out = render_chat("{{ strftime_now('%Y') }}", [], bos_token=None, eos_token=None)
    assert int(out) in (before, datetime.now().year)

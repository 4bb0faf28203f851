"""Chat templates: the model's own Jinja template, rendered the way ``transformers`` renders it.

A template ships inside a downloaded checkpoint, so it is untrusted code: it runs in jinja2's
``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation of the
messages), with the same settings and helpers as ``transformers.apply_chat_template``
(trim_blocks, lstrip_blocks, ``raise_exception``, ``strftime_now``, a JSON ``tojson``, loop
controls), so a prompt rendered here is the one the model was tuned on, character for character.

Mixtral-Instruct's template accepts no system role; ``prepare_messages`` notices the refusal and
folds the system text into the first user turn, as Mistral's own guidance suggests, and says so.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.exceptions as jexc
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MixcliError

# Mixtral-8x7B-Instruct-v0.1's own template: [INST] turns, no system role.
_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Plain ChatML (<|im_start|>role\n...<|im_end|>), without any model's default system prompt.
_CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# For checkpoints that ship no template: chosen by the caller (e.g. from models.toml).
FALLBACK_TEMPLATES: dict[str, str] = {"mistral": _MISTRAL, "chatml": _CHATML}


class TemplateError(MixcliError):
    """The chat template failed to render, or refused the conversation; the message says why."""


class _Raised(jexc.TemplateError):
    """What ``raise_exception`` throws: the template's own verdict on the conversation."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict: touching an unsafe attribute fails at once.

    jinja2's sandbox returns an undefined value for ``''.__class__`` that only fails when used
    further; refusing at the first touch gives a clearer error and no quiet empty output.
    """

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise jexc.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers in some templates): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, as transformers' does (no reach into internals)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jexc.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _raise_exception(message: str):
    raise _Raised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # as transformers: jinja's own tojson escapes HTML characters, which a prompt must not contain
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jexc.TemplateSyntaxError as err:
        raise TemplateError(
            f"the chat template does not parse: {err.message} (line {err.lineno})",
            "the template comes from the model's tokenizer_config.json; fix it there and re-convert",
        ) from err


def _plain(messages: Sequence[dict]) -> list[dict]:
    """Fresh dict copies, dropping None values (templates test for a missing key, not None)."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TemplateError(f"a chat message must be a dict, got {type(m).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat(
    template: str,
    messages: Sequence[dict],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` ([{"role", "content"}, ...]) to the prompt text the model expects.

    Special tokens appear as text (``<s>``); encode the result with ``parse_special=True``.
    A token given as None is left undefined, which Jinja renders as '' (as transformers does).
    """
    compiled = _compile(template)
    tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    try:
        return compiled.render(
            messages=_plain(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **tokens,
        )
    except _Raised as err:
        raise TemplateError(f"the chat template refused the conversation: {err.message}") from err
    except jexc.SecurityError as err:
        raise TemplateError(f"the chat template tried something the sandbox forbids: {err}") from err
    except jexc.TemplateError as err:
        raise TemplateError(f"the chat template failed: {err}") from err
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as err:
        # a template bug (e.g. str + None) surfaces as a plain Python error from inside the render
        raise TemplateError(f"the chat template failed: {type(err).__name__}: {err}") from err


def _fold_system(messages: list[dict]) -> list[dict]:
    """Leading system message(s) joined into the first user turn as "{system}\\n\\n{user}"."""
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    system = "\n\n".join(str(m.get("content", "")) for m in messages[:n])
    rest = [dict(m) for m in messages[n:]]
    if rest and rest[0].get("role") == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0].get('content', '')}"
    else:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def prepare_messages(
    template: str,
    messages: Sequence[dict],
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
) -> tuple[list[dict], str | None]:
    """Messages the template accepts, and a notice to show the user if we had to change them.

    Only one change is made: when the conversation opens with a system message and the template
    refuses it but accepts the same conversation with the system text folded into the first user
    turn, the folded messages are returned. Any other refusal is the template's original error.
    """
    msgs = _plain(messages)
    try:
        render_chat(
            template, msgs, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
        return msgs, None
    except TemplateError as err:
        if not msgs or msgs[0].get("role") != "system":
            raise
        folded = _fold_system(msgs)
        try:
            render_chat(
                template, folded, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
            )
        except TemplateError:
            raise err from None
    return folded, (
        "this model's chat template has no system role; "
        "the system prompt was added to the start of the first user message"
    )


def render_conversation(
    template: str,
    messages: Sequence[dict],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> tuple[str, str | None]:
    """``prepare_messages`` then ``render_chat``: (prompt_text, notice or None)."""
    msgs, notice = prepare_messages(
        template, messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )
    prompt = render_chat(
        template, msgs, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )
    return prompt, notice

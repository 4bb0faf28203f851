"""OpenAI's HTTP API, the parts a local server speaks: request bodies checked and turned into a
prompt and sampling settings, and the response / chunk / error objects in OpenAI's shapes.
No I/O here (mixcli/server.py does it); every problem is an ``ApiError`` with its HTTP status.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, replace

from .errors import MixcliError
from .sampling import SamplerConfig

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body above this is refused with 413
MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 512
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class TextRequest:
    """A checked request: what the engine needs, and how to answer."""

    kind: str  # "chat" or "completion"
    prompt: list[int]
    sampling: SamplerConfig
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str
    ignore_eos: bool = False


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{name} must be a number, got {v!r}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {v!r}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def _unsupported(body: dict) -> None:
    """Fields we cannot honour are refused rather than silently ignored."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n must be 1 (this server returns one choice per request), got {n!r}", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad(f"best_of must be 1, got {best_of!r}", "best_of")
    for name in ("logprobs", "top_logprobs", "echo", "suffix"):
        if body.get(name) not in (None, False, 0, ""):
            raise bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise bad(
                f"{name} is not supported (use repeat_penalty, llama.cpp's penalty)", name, "unsupported_parameter"
            )
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise bad("response_format other than text is not supported", "response_format", "unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in stops if s)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad(
            "messages must be a non-empty list of {role, content} objects",
            "messages",
            "invalid_type" if msgs is not None else "missing_required_parameter",
        )
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where, "invalid_type")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise bad(
                f"{where}.role must be one of system, developer, user, assistant, got {m.get('role')!r}",
                f"{where}.role",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise bad(f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out


def parse_request(
    kind: str, body, model, model_names: tuple[str, ...], defaults: SamplerConfig, ctx: int
) -> TextRequest:
    """Check a /v1/chat/completions (``kind`` "chat") or /v1/completions body and encode its
    prompt with ``model``'s tokenizer (and chat template). ``defaults``: the server's sampling."""
    from .runtime import chat_tokens

    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    name = body.get("model")
    if name is not None and (not isinstance(name, str) or name not in model_names):
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {model_names[0]!r}",
            param="model",
            code="model_not_found",
        )
    _unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    include_usage = bool((opts or {}).get("include_usage", False))
    if opts is not None and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")

    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    min_p = _number(body, "min_p", 0.0, 1.0)
    repeat_penalty = _number(body, "repeat_penalty", 0.0, 10.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, 1 << 30)
    seed = _integer(body, "seed")
    over = {
        "temperature": temperature,
        "top_p": top_p,
        "min_p": min_p,
        "repeat_penalty": repeat_penalty,
        "top_k": top_k,
        "seed": None if seed is None else seed % (1 << 63),
    }
    sampling = replace(defaults, **{k: v for k, v in over.items() if v is not None})
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, mt_name, 1, ctx)
    stop = _stop(body)
    ignore_eos = body.get("ignore_eos", False)  # llama-server's extension, for benchmarks
    if not isinstance(ignore_eos, bool):
        raise bad(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos", "invalid_type")

    try:
        if kind == "chat":
            if model.chat_template is None:
                raise bad(
                    "this model has no chat template; use /v1/completions with a raw prompt",
                    "messages",
                    "unsupported_model",
                )
            prompt = chat_tokens(model, _messages(body))[0]
        else:
            prompt = _prompt_tokens(body, model)
    except MixcliError as exc:  # e.g. the template refused the conversation
        raise bad(str(exc), "messages" if kind == "chat" else "prompt") from None
    if not prompt:
        raise bad("the prompt is empty", "messages" if kind == "chat" else "prompt")
    if len(prompt) >= ctx:
        raise bad(
            f"the prompt is {len(prompt)} tokens, the context holds {ctx} (one more is needed for the answer)",
            "messages" if kind == "chat" else "prompt",
            "context_length_exceeded",
        )
    room = ctx - len(prompt)
    max_tokens = room if max_tokens is None else min(max_tokens, room)
    return TextRequest(kind, prompt, sampling, max_tokens, stop, stream, include_usage, model_names[0], ignore_eos)


def _prompt_tokens(body: dict, model) -> list[int]:
    from .runtime import raw_tokens

    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt in a list
    if isinstance(p, str):
        return raw_tokens(model, p)
    V = model.config.vocab_size
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < V for t in p):
            raise bad(f"prompt token ids must be in 0..{V - 1}", "prompt")
        return list(p)
    if isinstance(p, list) and len(p) > 1:
        raise bad("one prompt per request (a list of several prompts is not supported)", "prompt")
    raise bad(
        "prompt must be a string or a list of token ids",
        "prompt",
        "missing_required_parameter" if p is None else "invalid_type",
    )


# ---- responses --------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_response(req: TextRequest, rid: str, created: int, text: str, finish: str, n_prompt: int, n_done: int) -> dict:
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": req.model,
        "choices": [choice],
        "usage": usage(n_prompt, n_done),
    }


def chunk(
    req: TextRequest,
    rid: str,
    created: int,
    text: str | None,
    finish: str | None,
    *,
    first: bool = False,
    usage_obj: dict | None = None,
) -> dict:
    """One server-sent event's object. ``usage_obj``: the closing usage chunk (no choices)."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": req.model}
    if usage_obj is not None:
        out["choices"] = []
        out["usage"] = usage_obj
        return out
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if req.include_usage:
        out["usage"] = None
    return out


def now() -> int:
    return int(time.time())

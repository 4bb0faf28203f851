"""The tokenizer a GGUF stores in its metadata -> a ``tokenizer.json`` our runtime loads.

A GGUF carries no tokenizer file, only llama.cpp's metadata: the token strings, their types
(1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), merges for byte-level BPE, scores for
SentencePiece vocabularies, special token ids and the chat template. We rebuild the tokenizer with
Hugging Face's ``tokenizers`` library, piece for piece as transformers does when it loads a GGUF
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py``: ``byte_level_tokenizer`` on
``GPT2Tokenizer``, ``sentencepiece_tokenizer`` on ``LlamaTokenizer``, ``add_gguf_special_tokens``,
``set_split_regex``), so the ids we feed the model are the ids transformers feeds it from the
same file -- the reference our parity tests compare against. transformers is not a runtime
dependency, hence the re-statement here rather than a call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError

TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
# the control tokens llama.cpp treats as end of generation besides EOS (llama-vocab.cpp, by text)
END_OF_GENERATION = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|eom_id|>")

# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' table; any
# other value keeps GPT-2's built-in ByteLevel regex, as transformers does)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece BPE vocabulary implies: every split of a token into two tokens,
    best score first (transformers' ``generate_merges`` with scores, same tie order)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(
        BPE(
            vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(tokens: list[str], scores: list[float], add_prefix_space: bool) -> Any:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores)))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    # LlamaTokenizer (legacy=False): a prefix space before the first piece only
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def build_tokenizer(
    meta: dict[str, Any],
    tokens: list[str],
    token_types: list[int] | None,
    merges: list[str] | None,
    scores: list[float] | None,
) -> Any:
    """A ``tokenizers.Tokenizer`` from GGUF tokenizer metadata (``meta`` holds the scalar keys)."""
    from tokenizers import AddedToken

    model = meta.get("tokenizer.ggml.model")
    types = list(token_types or [])
    if model == "gpt2":
        if merges is None:
            raise CheckpointError(
                "the GGUF's byte-level BPE tokenizer has no merges", "use an unmodified llama.cpp GGUF"
            )
        tok, alphabet = _byte_level(tokens, merges, meta.get("tokenizer.ggml.pre"))
        control_ok = lambda t: set(t) <= alphabet  # noqa: E731 - llama.cpp mislabels; transformers skips those
    elif model == "llama":
        if scores is None:
            raise CheckpointError(
                "the GGUF's SentencePiece tokenizer has no scores", "use an unmodified llama.cpp GGUF"
            )
        # transformers' LlamaTokenizer always prepends the space; llama.cpp's add_space_prefix says
        # the same for every Llama/Mistral GGUF
        tok = _sentencepiece(tokens, scores, add_prefix_space=True)
        control_ok = lambda t: True  # noqa: E731
    else:
        raise CheckpointError(
            f"the GGUF's tokenizer type {model or '(none given)'!s} is not supported",
            "mixcli reads GGUF tokenizers of type gpt2 (byte-level BPE) and llama (SentencePiece)",
        )
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_CONTROL and control_ok(t)
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=False)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)
    return tok


def template_family(template: str | None) -> str | None:
    if not isinstance(template, str):
        return None
    if "[INST]" in template:
        return "mistral"
    if "<|im_start|>" in template:
        return "chatml"
    return None


def write_tokenizer(ckpt: Any, out_dir: Path) -> dict[str, Any] | None:
    """Write ``tokenizer.json`` for an opened ``GGUFCheckpoint`` into ``out_dir``; return the
    manifest's "tokenizer" section (None when the GGUF carries no vocabulary)."""
    tokens = ckpt.field("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    tokens = [str(t) for t in tokens]
    meta = ckpt.metadata
    try:
        tok = build_tokenizer(
            meta,
            tokens,
            ckpt.field("tokenizer.ggml.token_type"),
            ckpt.field("tokenizer.ggml.merges"),
            ckpt.field("tokenizer.ggml.scores"),
        )
        tok.save(str(Path(out_dir) / "tokenizer.json"))
    except CheckpointError:
        raise
    except Exception as exc:  # tokenizers raises TypeError, ValueError, its own Exception on bad vocabularies
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"the GGUF's tokenizer (tokenizer.ggml.tokens, merges, scores, token_type) is malformed: {detail}",
            "download the .gguf file again (it is damaged or incomplete)",
        ) from None

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if isinstance(i, int) and 0 <= i < len(tokens) else None

    model = meta.get("tokenizer.ggml.model")
    template = meta.get("tokenizer.chat_template")
    family = template_family(template)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = model == "llama"  # llama.cpp's default for SentencePiece vocabularies without the flag
    eos = token("eos_token_id")
    bos = token("bos_token_id")
    # generation also stops at llama.cpp's end-of-generation tokens: the end of a chat turn
    # (``<|im_end|>`` in ChatML) and the end of a document the model may emit instead
    types = ckpt.field("tokenizer.ggml.token_type") or []
    present = {t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL}
    if family == "chatml" and "<|im_end|>" in tokens:
        present.add("<|im_end|>")
    extra_eos = [t for t in END_OF_GENERATION if t in present and t != eos]
    return {
        "kind": "hf-json",
        "file": "tokenizer.json",
        "config_file": None,
        "bos_token": bos,
        "eos_token": eos,
        "add_bos": bool(add_bos and bos is not None),
        "extra_eos_tokens": extra_eos,
        "chat_template": template if isinstance(template, str) else None,
        "template_family": family,
    }

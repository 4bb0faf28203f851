"""Text <-> token ids behind one interface, over the two tokenizer kinds a checkpoint ships.

* ``sentencepiece``: ``tokenizer.model`` read by the ``sentencepiece`` library (Llama, Mistral,
  Mixtral: BPE with byte fallback).
* ``hf-json``: ``tokenizer.json`` read by Hugging Face's ``tokenizers`` library (GPT-2 style
  byte-level BPE, SmolLM2, Qwen, ...). We never reimplement a tokenizer: both libraries are the
  reference implementations, and this module only adds what they lack for a chat REPL:

1. *Special tokens written as text.* Chat templates render ``<s>`` or ``<|im_start|>`` as plain
   text, so ``encode(..., parse_special=True)`` turns those spellings back into their ids.
   SentencePiece cannot do this itself (its control symbols never match text), so for it we split
   the text on the special spellings and encode each plain chunk on its own; every chunk then gets
   SentencePiece's dummy-prefix space, which is what Hugging Face's ``legacy=True`` Llama tokenizer
   and llama.cpp do, so ``<s>[INST] hi`` -> ``<s> ▁[ INST ] ▁hi`` as Mixtral was trained.
2. *Streaming.* ``StreamDecoder`` turns one id at a time into text that can be printed at once and
   never changes: it holds back while the tail is an incomplete UTF-8 character (byte-fallback or
   byte-level tokens) and keeps SentencePiece's "no space before the first word" rule, so the
   concatenation of everything it emits equals ``decode(all_ids)``.
"""

from __future__ import annotations

import abc
import json
import pathlib
import re
from collections.abc import Callable, Sequence

from .errors import ModelFormatError

_REPLACEMENT = "\ufffd"  # what both libraries decode an incomplete UTF-8 sequence to


class Tokenizer(abc.ABC):
    """The interface the rest of mixcli uses; see ``load_tokenizer``.

    Attributes: ``vocab_size`` (ids are ``0..vocab_size-1``), ``bos_id`` / ``bos_token`` and
    ``eos_token`` (strings for chat templates; ``None`` when the model has none), ``eos_ids`` (every
    id that ends generation), ``add_bos`` (whether a raw prompt should start with BOS: pass it to
    ``encode`` for plain prompts; rendered chat templates already contain the BOS text).
    """

    vocab_size: int
    bos_id: int | None
    eos_ids: frozenset[int]
    bos_token: str | None
    eos_token: str | None
    add_bos: bool

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> ids. ``parse_special``: spellings of special/added tokens become those tokens."""
        ids = self._encode(text, parse_special)
        if add_bos:
            if self.bos_id is None:
                raise ModelFormatError("this model's tokenizer has no BOS token", "encode without add_bos")
            ids.insert(0, self.bos_id)
        return ids

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text. ``skip_special`` drops BOS/EOS/UNK and other special tokens."""

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh incremental decoder; push generated ids into it one at a time."""
        return StreamDecoder(lambda ids: self.decode(ids, skip_special=skip_special))

    @abc.abstractmethod
    def id_of(self, token: str) -> int | None:
        """The id of a token spelled exactly as in the vocabulary (e.g. ``"<|im_end|>"``), or None."""

    @abc.abstractmethod
    def _encode(self, text: str, parse_special: bool) -> list[int]:
        """Text -> ids without BOS."""

    def _init_specials(self, info: dict) -> None:
        """Resolve the manifest's token strings to ids, refusing any the vocabulary lacks."""

        def resolve(token: str, what: str) -> int:
            tid = self.id_of(token)
            if tid is None:
                raise ModelFormatError(
                    f"the tokenizer has no token {token!r} (the manifest's {what})", "re-convert the model"
                )
            return tid

        self.bos_token = info.get("bos_token") or None
        self.eos_token = info.get("eos_token") or None
        self.add_bos = bool(info.get("add_bos", False))
        self.bos_id = resolve(self.bos_token, "bos_token") if self.bos_token else None
        if self.add_bos and self.bos_id is None:
            raise ModelFormatError("the manifest asks for add_bos but names no bos_token", "re-convert the model")
        eos = [self.eos_token] if self.eos_token else []
        eos += list(info.get("extra_eos_tokens") or [])
        self.eos_ids = frozenset(resolve(t, "eos token") for t in eos)


class StreamDecoder:
    """Incremental detokenizer: ``concat(push(t) for t in ids) + flush() == decode(ids)``.

    Why a window and not one token at a time: a token's text depends on its neighbours (a
    SentencePiece ``▁word`` is `` word`` mid-text but ``word`` at the start; a byte token is half a
    character until the rest arrives). So, as text-generation-inference and HF's TextStreamer do, we
    decode a short window that starts at the last token already printed and emit only the new
    suffix. The window restarts after each emission, so each push decodes a handful of ids, not the
    whole history. Text is held back while it ends in U+FFFD (an unfinished UTF-8 character).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []  # window: the last printed token(s) and everything after
        self._read = 0  # window index of the first id whose text is not printed yet
        self._prefix = ""  # decode(self._ids[:self._read]), the already-printed part of the window

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final (often '', never half a character)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith(_REPLACEMENT):
            return ""
        out = text[len(self._prefix) :]
        # the next window starts at the first id printed just now, so its leading-space rule holds
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix = self._decode(self._ids)
        return out

    def flush(self) -> str:
        """Return whatever is held back (end of generation) and start afresh."""
        text = self._decode(self._ids)
        out = text[len(self._prefix) :] if len(text) > len(self._prefix) else ""
        self._ids, self._read, self._prefix = [], 0, ""
        return out


class SentencePieceTokenizer(Tokenizer):
    """``tokenizer.model`` through the ``sentencepiece`` library, plus added tokens it cannot hold.

    Added tokens come from ``tokenizer_config.json``'s ``added_tokens_decoder``: ids inside the
    SentencePiece vocabulary keep their piece; ids past its end (e.g. ``<|im_start|>`` = 32000 in
    fine-tunes that grew the vocabulary) exist only here and are encoded/decoded by us.
    """

    def __init__(self, model_path: pathlib.Path, info: dict, added: dict[int, dict]):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as err:
            raise ModelFormatError(f"cannot read {model_path.name}: {err}", "re-convert the model") from err
        sp = self._sp
        n_sp = sp.get_piece_size()
        special: set[int] = set()  # ids dropped by decode(skip_special=True)
        literal: dict[int, str] = {}  # ids whose text we render (sentencepiece drops or lacks them)
        spelled: dict[str, int] = {}  # text spelling -> id, for parse_special
        for i in range(n_sp):
            if sp.is_control(i) or sp.is_unknown(i):
                special.add(i)
                literal[i] = sp.id_to_piece(i)
                spelled[sp.id_to_piece(i)] = i
        for i, tok in added.items():
            content = str(tok.get("content", ""))
            if not content:
                continue
            spelled[content] = i
            if tok.get("special", False):
                special.add(i)
            if i >= n_sp or i in literal:
                literal[i] = content
        self.vocab_size = max([n_sp] + [i + 1 for i in literal])
        self._special = frozenset(special)
        self._literal = literal
        self._spelled = spelled
        # longest spelling first, so "<|im_start|>" wins over a shorter token that prefixes it
        alts = sorted(spelled, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")") if alts else None
        self._init_specials(info)

    def id_of(self, token: str) -> int | None:
        if token in self._spelled:
            return self._spelled[token]
        i = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only a real unk piece may map to it
        return i if i != self._sp.unk_id() or token == self._sp.id_to_piece(i) else None

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._split is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:  # re.split with one group: odd items are the matched spellings
                ids.append(self._spelled[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Runs of ordinary ids go to sentencepiece; literal tokens are spliced in between.

        Each run loses its dummy-prefix space like a whole sentencepiece decode does, which makes
        ``decode(skip_special=False)`` the inverse of ``encode(parse_special=True)``. Ids the
        vocabulary does not cover (a model whose embedding is padded past the tokenizer) decode to
        nothing rather than failing mid-stream.
        """
        n_sp = self._sp.get_piece_size()
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if skip_special and i in self._special:
                continue
            if i in self._literal:
                if run:
                    pieces.append(self._sp.decode(run))
                    run = []
                pieces.append(self._literal[i])
            elif 0 <= i < n_sp:
                run.append(i)
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)


class HFJsonTokenizer(Tokenizer):
    """``tokenizer.json`` through Hugging Face's ``tokenizers`` library, which does all the work."""

    def __init__(self, json_path: pathlib.Path, info: dict, added: dict[int, dict]):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(json_path))
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise ModelFormatError(f"cannot read {json_path.name}: {err}", "re-convert the model") from err
        for i, t in sorted(added.items()):
            content = str(t.get("content", ""))
            if not content or tok.token_to_id(content) is not None:
                continue
            new = AddedToken(
                content,
                single_word=bool(t.get("single_word", False)),
                lstrip=bool(t.get("lstrip", False)),
                rstrip=bool(t.get("rstrip", False)),
                normalized=bool(t.get("normalized", not t.get("special", False))),
                special=bool(t.get("special", False)),
            )
            (tok.add_special_tokens if t.get("special", False) else tok.add_tokens)([new])
            if tok.token_to_id(content) != i:
                raise ModelFormatError(
                    f"tokenizer_config.json puts {content!r} at id {i}, which tokenizer.json cannot",
                    "re-convert the model",
                )
        self._tok = tok
        self._plain: HFTokenizer | None = None  # a copy that reads special spellings as text
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._init_specials(info)

    def id_of(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        tok = self._tok
        if not parse_special:
            if self._plain is None:
                # a separate object, so the shared one's setting never flips under another caller
                from tokenizers import Tokenizer as HFTokenizer

                self._plain = HFTokenizer.from_str(tok.to_str())
                self._plain.encode_special_tokens = True
            tok = self._plain
        # BOS is ours to add (Tokenizer.encode), so the file's post-processor stays out of it
        return list(tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _model_file(model_dir: pathlib.Path, rel: object, what: str) -> pathlib.Path:
    """``model_dir / rel``, refusing names that are not plain relative paths inside the directory."""
    if not isinstance(rel, str) or not rel:
        raise ModelFormatError(f"the manifest's tokenizer {what} is missing", "re-convert the model")
    root = model_dir.resolve()
    path = (root / rel).resolve()
    if path == root or not path.is_relative_to(root):
        raise ModelFormatError(
            f"the manifest's tokenizer {what} {rel!r} points outside the model directory",
            "re-convert the model; a converted model names only its own files",
        )
    if not path.is_file():
        raise ModelFormatError(f"tokenizer file {rel!r} is missing from {model_dir}", "re-convert the model")
    return path


def _added_tokens(model_dir: pathlib.Path, config_file: object) -> dict[int, dict]:
    """``added_tokens_decoder`` of tokenizer_config.json as {id: {"content", "special", ...}}."""
    if not config_file:
        return {}
    path = _model_file(model_dir, config_file, "config_file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        raw = cfg.get("added_tokens_decoder") or {}
        return {int(k): (v if isinstance(v, dict) else {"content": str(v)}) for k, v in raw.items()}
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        msg = f"{config_file} is not a valid tokenizer config: {err}"
        raise ModelFormatError(msg, "re-convert the model") from err


def load_tokenizer(model_dir: pathlib.Path, info: dict) -> Tokenizer:
    """Build the tokenizer a manifest's ``tokenizer`` section describes.

    ``info``: {"kind": "sentencepiece" | "hf-json", "file", "config_file" (or None), "bos_token",
    "eos_token", "add_bos", "extra_eos_tokens"}; file names are relative to ``model_dir``.
    """
    model_dir = pathlib.Path(model_dir)
    kind = info.get("kind")
    if kind not in ("sentencepiece", "hf-json"):
        raise ModelFormatError(
            f"unknown tokenizer kind {kind!r} in the manifest", "mixcli reads 'sentencepiece' and 'hf-json'"
        )
    path = _model_file(model_dir, info.get("file"), "file")
    added = _added_tokens(model_dir, info.get("config_file"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, info, added)
    return HFJsonTokenizer(path, info, added)

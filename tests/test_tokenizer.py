"""mixcli.tokenizer against the libraries it wraps, on tokenizers trained here from tests/data.

References: the ``sentencepiece`` library (encode/decode of plain text) and Hugging Face's
``tokenizers`` (everything for tokenizer.json, including its own special-token parsing). Streaming
is checked against whole-sequence ``decode`` for every prefix and for random id sequences, which
is where half characters and leading spaces go wrong.
"""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mixcli.errors import MixcliError, ModelFormatError
from mixcli.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

CORPUS = pathlib.Path(__file__).parent / "data" / "tok_corpus.txt"

SAMPLES = [
    "Hello world",
    "The lazy dog does not mind.",
    "  two leading spaces",
    "runs   of    spaces     here",
    "tabs\tand\nnewlines\n\nand a blank line",
    "trailing space ",
    "Café, naïve, crème brûlée, Zürich, Ærøskøbing",
    "中文文本：你好，世界！今日は良い天気ですね。",
    "emoji 🙂🚀 👨‍👩‍👧 🇫🇷 ❤️ end",
    # characters the corpus never shows, so they can only come out as byte-fallback pieces
    "unseen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ŋ Ω ฿ กขฃ 🦀🧪",
    "def f(x):\n    return x ** 2  # comment\n",
    " ",
    "\n",
    "x",
]

SPM_ADDED = {  # tokenizer_config.json's added_tokens_decoder, Mixtral-like plus two grown ids
    "0": {"content": "<unk>", "special": True},
    "1": {"content": "<s>", "special": True},
    "2": {"content": "</s>", "special": True},
    "500": {"content": "<|im_start|>", "special": True},
    "501": {"content": "<|im_end|>", "special": True},
}


def _added(d: dict) -> dict:
    full = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    return {"added_tokens_decoder": {k: {**full, **v} for k, v in d.items()}}


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> tuple[pathlib.Path, spm.SentencePieceProcessor]:
    d = tmp_path_factory.mktemp("spm")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(CORPUS),
        model_writer=buf,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        # as Llama/Mistral: identity normalization, keep whitespace runs, dummy prefix on
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps(_added(SPM_ADDED)))
    return d, spm.SentencePieceProcessor(model_proto=buf.getvalue())


SPM_INFO = {
    "kind": "sentencepiece",
    "file": "tokenizer.model",
    "config_file": "tokenizer_config.json",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_bos": True,
    "extra_eos_tokens": ["<|im_end|>"],
}


@pytest.fixture(scope="session")
def spm_tok(spm_model) -> Tokenizer:
    return load_tokenizer(spm_model[0], SPM_INFO)


HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> tuple[pathlib.Path, HFTokenizer]:
    """A GPT-2 style byte-level BPE, as SmolLM2 ships it, plus one token only the config names."""
    d = tmp_path_factory.mktemp("hfjson")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=HF_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    tok.save(str(d / "tokenizer.json"))
    added = {str(i): {"content": t, "special": True} for i, t in enumerate(HF_SPECIALS)}
    n = tok.get_vocab_size(with_added_tokens=True)
    added[str(n)] = {"content": "<|tool|>", "special": True}  # not in tokenizer.json: we add it
    (d / "tokenizer_config.json").write_text(json.dumps(_added(added)))
    return d, HFTokenizer.from_file(str(d / "tokenizer.json"))


HF_INFO = {
    "kind": "hf-json",
    "file": "tokenizer.json",
    "config_file": "tokenizer_config.json",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "add_bos": False,
    "extra_eos_tokens": ["<|endoftext|>"],
}


@pytest.fixture(scope="session")
def hf_tok(hf_model) -> Tokenizer:
    return load_tokenizer(hf_model[0], HF_INFO)


@pytest.fixture(scope="session")
def metaspace_dir(tmp_path_factory) -> pathlib.Path:
    """A tokenizer.json in SentencePiece style (Metaspace: '▁' for spaces, first one stripped)."""
    d = tmp_path_factory.mktemp("metaspace")
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    tok.save(str(d / "tokenizer.json"))
    return d


# ---------------------------------------------------------------- parity with the libraries


@pytest.mark.parametrize("text", SAMPLES)
def test_spm_encode_decode_match_sentencepiece(spm_model, spm_tok, text):
    _, sp = spm_model
    ref = sp.encode(text)
    assert spm_tok.encode(text) == ref
    assert spm_tok.encode(text, parse_special=False) == ref
    assert spm_tok.encode(text, add_bos=True) == [sp.bos_id()] + ref
    assert spm_tok.decode(ref) == sp.decode(ref)
    assert spm_tok.decode([sp.bos_id()] + ref + [sp.eos_id()]) == sp.decode(ref)
    assert spm_tok.decode(ref) == text  # identity normalization: lossless


def test_spm_samples_exercise_byte_fallback(spm_model):
    _, sp = spm_model
    pieces = [sp.id_to_piece(i) for s in SAMPLES for i in sp.encode(s)]
    assert sum(p.startswith("<0x") for p in pieces) > 20


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_encode_decode_match_tokenizers(hf_model, hf_tok, text):
    _, ref_tok = hf_model
    ref = ref_tok.encode(text, add_special_tokens=False).ids
    assert hf_tok.encode(text) == ref
    assert hf_tok.encode(text, parse_special=False) == ref
    assert hf_tok.decode(ref) == ref_tok.decode(ref) == text


def test_metaspace_json_matches_tokenizers(metaspace_dir):
    ref = HFTokenizer.from_file(str(metaspace_dir / "tokenizer.json"))
    tok = load_tokenizer(
        metaspace_dir, {**HF_INFO, "config_file": None, "bos_token": "<s>", "eos_token": "</s>", "extra_eos_tokens": []}
    )
    for text in SAMPLES[:7]:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids
        assert tok.decode(ids) == ref.decode(ids)
        assert _streamed(tok, ids) == tok.decode(ids)


# ---------------------------------------------------------------- special tokens


def test_spm_specials_and_vocab(spm_model, spm_tok):
    _, sp = spm_model
    assert spm_tok.vocab_size == 502  # 500 pieces + two ids only tokenizer_config.json knows
    assert spm_tok.bos_id == sp.bos_id() == 1
    assert spm_tok.eos_ids == frozenset({sp.eos_id(), 501})
    assert (spm_tok.bos_token, spm_tok.eos_token, spm_tok.add_bos) == ("<s>", "</s>", True)
    assert spm_tok.id_of("<|im_start|>") == 500
    assert spm_tok.id_of("no such piece") is None


def test_spm_parse_special_splits_like_llama_legacy(spm_model, spm_tok):
    """Each plain chunk is encoded on its own (dummy prefix included), specials become their ids."""
    _, sp = spm_model
    text = "<s>[INST] Hi there [/INST]Hello</s>[INST] more <|im_start|>user\nok<|im_end|>"
    expect = (
        [1]
        + sp.encode("[INST] Hi there [/INST]Hello")
        + [2]
        + sp.encode("[INST] more ")
        + [500]
        + sp.encode("user\nok")
        + [501]
    )
    ids = spm_tok.encode(text, parse_special=True)
    assert ids == expect
    # as text, the spellings are ordinary characters; none of them becomes a special id
    plain = spm_tok.encode(text, parse_special=False)
    assert plain == sp.encode(text)
    assert not set(plain) & {0, 1, 2, 500, 501}
    # decode(skip_special=False) is encode(parse_special=True)'s inverse; skipping drops the specials
    assert spm_tok.decode(ids, skip_special=False) == text
    # sentencepiece itself drops control ids (<s>, </s>); the grown ids it cannot see at all
    assert spm_tok.decode(ids) == sp.decode([i for i in ids if i < sp.get_piece_size()])


def test_hf_parse_special_matches_tokenizers(hf_model, hf_tok):
    _, ref_tok = hf_model
    text = "<|im_start|>user\nCafé 🙂<|im_end|>\n<|im_start|>assistant\n"
    ids = hf_tok.encode(text)
    assert ids == ref_tok.encode(text, add_special_tokens=False).ids
    specials = {hf_tok.id_of(t) for t in HF_SPECIALS}
    assert ids.count(hf_tok.id_of("<|im_start|>")) == 2
    plain = hf_tok.encode(text, parse_special=False)
    assert not set(plain) & specials
    assert hf_tok.decode(plain) == text
    assert hf_tok.decode(ids, skip_special=False) == text
    assert hf_tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True)
    # the shared tokenizer still parses specials after a parse_special=False call
    assert hf_tok.encode(text) == ids


def test_hf_config_only_token_is_added(hf_model, hf_tok):
    _, ref_tok = hf_model
    n = ref_tok.get_vocab_size(with_added_tokens=True)
    assert hf_tok.id_of("<|tool|>") == n
    assert hf_tok.vocab_size == n + 1
    assert (
        hf_tok.encode("a<|tool|>b")
        == ref_tok.encode("a", add_special_tokens=False).ids + [n] + ref_tok.encode("b", add_special_tokens=False).ids
    )
    assert hf_tok.eos_ids == frozenset({ref_tok.token_to_id("<|im_end|>"), ref_tok.token_to_id("<|endoftext|>")})
    assert hf_tok.bos_id == ref_tok.token_to_id("<|im_start|>")


# ---------------------------------------------------------------- streaming


def _streamed(tok: Tokenizer, ids: list[int], skip_special: bool = True) -> str:
    s = tok.stream(skip_special=skip_special)
    chunks = [s.push(i) for i in ids]
    return "".join(chunks) + s.flush()


@pytest.mark.parametrize("which", ["spm", "hf"])
def test_stream_every_prefix_equals_decode(which, spm_tok, hf_tok):
    tok = spm_tok if which == "spm" else hf_tok
    for text in SAMPLES:
        ids = tok.encode(text)
        for n in range(len(ids) + 1):
            assert _streamed(tok, ids[:n]) == tok.decode(ids[:n]), (text, n)
        # whole, valid text: no push ever shows half a character or a raw '▁'
        s = tok.stream()
        chunks = [s.push(i) for i in ids]
        assert not any("\ufffd" in c or "▁" in c for c in chunks), (text, chunks)
        assert "".join(chunks) + s.flush() == text


def test_stream_leading_space_rule(spm_model, spm_tok):
    """A reply starts without the '▁' space, later words keep theirs, specials vanish."""
    _, sp = spm_model
    ids = [sp.bos_id()] + sp.encode("Hello there, world") + [sp.eos_id()]
    s = spm_tok.stream()
    out = [s.push(i) for i in ids]
    assert "".join(out) + s.flush() == "Hello there, world"
    assert out[0] == "" and out[-1] == ""
    assert next(c for c in out if c)[0] == "H"


def test_stream_holds_back_partial_utf8(spm_model, spm_tok):
    _, sp = spm_model
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "🦀".encode()]
    s = spm_tok.stream()
    assert [s.push(i) for i in byte_ids[:-1]] == ["", "", ""]
    assert s.push(byte_ids[-1]) == "🦀"
    assert s.flush() == ""


@pytest.mark.parametrize("which", ["spm", "hf"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_stream_random_ids_equals_decode(which, skip_special, spm_tok, hf_tok):
    """Arbitrary id sequences (broken UTF-8, specials anywhere) still satisfy the contract."""
    tok = spm_tok if which == "spm" else hf_tok
    rng = np.random.default_rng(1234)
    for _ in range(60):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 40))).tolist()
        assert _streamed(tok, ids, skip_special) == tok.decode(ids, skip_special=skip_special), ids


def test_stream_window_stays_small(spm_tok):
    """Each push decodes a window of a few ids, not the history (the O(1) per token promise)."""
    seen: list[int] = []

    def decode(ids):
        seen.append(len(ids))
        return spm_tok.decode(ids)

    s = StreamDecoder(decode)
    ids = spm_tok.encode(" ".join(SAMPLES) * 3)
    text = "".join(s.push(i) for i in ids) + s.flush()
    assert text == spm_tok.decode(ids)
    assert len(ids) > 300 and max(seen) <= 8


# ---------------------------------------------------------------- bad manifests


@pytest.mark.parametrize(
    "change",
    [
        {"file": "../tokenizer.model"},
        {"file": "/etc/passwd"},
        {"config_file": "../../tokenizer_config.json"},
        {"file": "missing.model"},
        {"file": None},
        {"kind": "tiktoken"},
        {"eos_token": "<|nope|>"},
        {"extra_eos_tokens": ["<|nope|>"]},
        {"bos_token": None, "add_bos": True},
    ],
)
def test_bad_manifest_is_refused(spm_model, change):
    with pytest.raises(ModelFormatError) as err:
        load_tokenizer(spm_model[0], {**SPM_INFO, **change})
    assert isinstance(err.value, MixcliError) and "\n" not in str(err.value)


def test_corrupt_files_are_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError):
        load_tokenizer(tmp_path, {**SPM_INFO, "config_file": None})
    with pytest.raises(ModelFormatError):
        load_tokenizer(tmp_path, {**HF_INFO, "config_file": None})


@pytest.mark.parametrize("config", ["{not json", '{"added_tokens_decoder": {"x": {"content": "<s>"}}}', "[1, 2]"])
def test_corrupt_tokenizer_config_is_refused(spm_model, tmp_path, config):
    (tmp_path / "tokenizer.model").write_bytes((spm_model[0] / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ModelFormatError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path, SPM_INFO)

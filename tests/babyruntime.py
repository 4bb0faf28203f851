"""A baby chat model for the CLI tests: a converted random-weight baby Mixtral with a REAL tokenizer.

The tokenizer is a BPE with SentencePiece-style ``▁`` word boundaries (Metaspace, as Mistral's
tokenizer.json) trained here with Hugging Face's ``tokenizers`` on tests/data/tok_corpus.txt, with
ChatML special tokens and a ChatML chat template in tokenizer_config.json, so ``mixcli generate`` / ``mixcli chat`` run on it exactly as on
a downloaded instruct model: template rendering, special tokens, EOS, streaming detokenization.
The weights are random (babymodels.make_hf_checkpoint), so the text is gibberish, but it is
deterministic under ``--temp 0`` and the model answers in milliseconds. No piece is a lone byte
(no byte fallback), so any token sequence decodes to valid text: the tests can match it exactly.

``baby_chat_model(dir)`` builds once and reuses what an earlier call left in ``dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from babymodels import make_hf_checkpoint

CORPUS = Path(__file__).parent / "data" / "tok_corpus.txt"
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
VOCAB = 400
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
RAISING = "{{ raise_exception('this template refuses every conversation') }}"


def write_tokenizer(d: Path, template: str = CHATML) -> int:
    """tokenizer.json + tokenizer_config.json (ChatML specials, EOS <|im_end|>) in ``d``; the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    tok.save(str(d / "tokenizer.json"))
    full = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(i): {"content": t, **full} for i, t in enumerate(SPECIALS)},
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": template,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def baby_chat_model(
    root: str | Path, *, name: str = "baby-chat", template: str = CHATML, max_positions: int = 4096, seed: int = 3
) -> Path:
    """A converted (q4_0) baby Mixtral with a trained byte-level BPE and ``template``, in root/name."""
    from quant.convert import convert_checkpoint

    root = Path(root)
    out = root / name
    if (out / "manifest.json").is_file():
        return out
    src = root / f"{name}-src"
    vocab = write_tokenizer(src / "tok", template)
    make_hf_checkpoint(
        src / "hf",
        "mixtral",
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        seed=seed,
        tokenizer_dir=src / "tok",
    )
    convert_checkpoint(src / "hf", out, "q4_0")
    return out

"""The forward pass against Hugging Face transformers' own Mixtral / Llama on the same weights.

Baby checkpoints (written as safetensors by tests/babymodels.py, then trained for a few seconds on
a 400-token passage by tests/babytrain.py) are loaded by transformers directly and converted by
mixcli; both run the same 64 tokens of that passage.

Why trained: a random-weight baby predicts almost uniformly (its top two logits are typically
closer than 4-bit rounding moves them), so 4-bit greedy agreement would measure coin flips.
Trained on the passage, the baby is as confident there as a real model is on ordinary text, and
the 4-bit test measures what users see. Agreement on random tokens is printed for information.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mixcli
from babymodels import make_hf_checkpoint
from babytrain import corpus_tokens, train_checkpoint
from quant.convert import convert_checkpoint

SEQ = 64
PASSAGE = 400  # tokens of tests/data/tok_corpus.txt the babies learn
CASES = {
    # name: (kind, overrides)
    "mixtral": ("mixtral", {}),
    "llama": ("llama", {}),
    "mixtral-tied": ("mixtral", {"tied": True}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (hf_dir, {quant: converted_dir}, reference logits [SEQ, V], tokens [SEQ])."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, (name, (kind, kw)) in enumerate(CASES.items()):
        base = tmp_path_factory.mktemp(name)
        src = make_hf_checkpoint(base / "hf", kind, dtype="f16", seed=10 + i, **kw)
        train_checkpoint(src, steps=300, seed=i, text_tokens=PASSAGE)
        conv = {}
        for q in ("f16", "q4_0", "q4_k"):
            conv[q] = base / f"conv-{q}"
            convert_checkpoint(src, conv[q], quant=q)
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        vocab = ref.config.vocab_size
        tokens = corpus_tokens(vocab)[100 : 100 + SEQ].tolist()  # inside the learned passage
        with torch.no_grad():
            logits = ref(torch.tensor([tokens])).logits[0].float().numpy()  # [SEQ, V]
            rand = np.random.default_rng(i).integers(0, vocab, SEQ).tolist()
            rand_logits = ref(torch.tensor([rand])).logits[0].float().numpy()  # [SEQ, V]
        out[name] = (src, conv, logits, tokens, rand, rand_logits)
    return out


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(CASES))
def test_f16_prefill_matches_transformers(checkpoints, name):
    _, conv, ref, tokens, *_ = checkpoints[name]
    model = mixcli.load(conv["f16"], ctx=128)
    ours = model.logits(tokens)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert _rel_err(ours, ref) <= 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_f16_decode_matches_transformers(checkpoints, name):
    _, conv, ref, tokens, *_ = checkpoints[name]
    model = mixcli.load(conv["f16"], ctx=128)
    model.reset()
    rows = [model.prefill(tokens[:1]).copy()]
    for t in tokens[1:]:
        rows.append(model.decode(t).copy())
    assert _rel_err(np.stack(rows), ref) <= 1e-3


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def logsm(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = logsm(p_logits.astype(np.float64)), logsm(q_logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


@pytest.mark.parametrize("quant", ["q4_0", "q4_k"])
@pytest.mark.parametrize("name", list(CASES))
def test_q4_agrees_with_transformers(checkpoints, name, quant, capsys):
    _, conv, ref, tokens, rand, rand_ref = checkpoints[name]
    model = mixcli.load(conv[quant], ctx=128)
    ours = model.logits(tokens)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    kl = float(_kl(ref, ours).mean())
    rand_ours = model.logits(rand)
    rand_agree = float((rand_ours.argmax(-1) == rand_ref.argmax(-1)).mean())
    with capsys.disabled():
        print(
            f"\n[{name} {quant}] greedy agreement {agree:.1%}, mean KL(ref || ours) {kl:.5f} nats "
            f"(random tokens: {rand_agree:.1%}, KL {float(_kl(rand_ref, rand_ours).mean()):.5f})"
        )
    assert agree >= 0.95
    assert kl < 0.1  # a sanity bound; the figure itself is printed above


@pytest.mark.parametrize("quant", ["f16", "q4_0", "q4_k"])
def test_incremental_decode_equals_full_forward(checkpoints, quant):
    """mistral-inference's check: a cached, token-by-token run equals one pass over the sequence,
    and so does a prefill split into uneven batches."""
    _, conv, _, tokens, *_ = checkpoints["mixtral"]
    # exact activations: float rounding only; the default int8 activations: decode and prefill
    # round x identically but sum in other orders, and at the avx2 tier a q4_k run drifted by up to
    # 3.2e-4 of the largest logit over the baby's 64 tokens (an open question, see the issue notes)
    for act, tol in (("f32", 2e-4), (None, 1e-3)):
        full = mixcli.load(conv[quant], ctx=128, act=act).logits(tokens)
        model = mixcli.load(conv[quant], ctx=128, batch=7, act=act)  # prefill in batches of 7
        half = SEQ // 2
        model.reset()
        first = model.prefill(tokens[:half], want_all=True)
        rest = [model.decode(t).copy() for t in tokens[half:]]
        step = np.concatenate([first, np.stack(rest)])
        np.testing.assert_allclose(step, full, rtol=0, atol=tol * np.abs(full).max(), err_msg=f"act {act}")

"""Why the default 4-bit format is q4_0 with groups of 32: the measurements behind the choice.

    python benchmarks/quant_choice.py [--skip-babies]

Part 1 simulates symmetric (q4_0's rule: the largest-magnitude value maps to -8) and asymmetric
(q4_1's rule: min and range) 4-bit blocks at group sizes 16, 32, 64, 128 with fp16 scales, on
Gaussian and heavy-tailed (Student t, 5 dof) weight matrices, and prints bits per weight, the
relative RMS weight error and the relative error of W @ x. The group-32 rows are checked against
quant/q4.py (bit-exact with the gguf package), so the simulation is the real format there.
Part 2 converts the trained baby checkpoints of tests/test_model_parity.py with each storage type
mixcli offers and prints greedy agreement and mean KL against transformers (needs torch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quant import q4  # noqa: E402


def _h(a: np.ndarray) -> np.ndarray:
    """fp16-rounded, as the scales are stored."""
    return a.astype(np.float16).astype(np.float32)


def simulate(w: np.ndarray, group: int, asym: bool) -> np.ndarray:
    """W [N, K] -> its 4-bit reconstruction with one fp16 scale (and min) per ``group``."""
    n, k = w.shape
    x = w.reshape(n, k // group, group).astype(np.float32)  # [N, NB, G]
    with np.errstate(divide="ignore", invalid="ignore"):
        if asym:
            lo = x.min(axis=2)
            d32 = (x.max(axis=2) - lo) / 15.0
            inv = np.where(d32 != 0, 1.0 / d32, 0.0)
            q = np.clip(np.trunc((x - lo[:, :, None]) * inv[:, :, None] + 0.5), 0, 15)
            out = q * _h(d32)[:, :, None] + _h(lo)[:, :, None]
        else:
            idx = np.abs(x).argmax(axis=2)
            mx = np.take_along_axis(x, idx[:, :, None], axis=2)[:, :, 0]
            d32 = mx / -8.0
            inv = np.where(d32 != 0, 1.0 / d32, 0.0)
            q = np.clip(np.trunc(x * inv[:, :, None] + 8.5), 0, 15)
            out = (q - 8.0) * _h(d32)[:, :, None]
    return out.reshape(n, k)


def weight_table() -> None:
    rng = np.random.default_rng(0)
    n, k = 1024, 4096
    mats = {
        "gaussian": rng.standard_normal((n, k)).astype(np.float32),
        "student-t5": rng.standard_t(5, (n, k)).astype(np.float32),
    }
    x = rng.standard_normal((k, 16)).astype(np.float32)
    for qt, asym in (("q4_0", False), ("q4_1", True)):  # the simulation is the real format at G=32
        w = mats["gaussian"][:64]
        real = q4.dequantize(q4.quantize(w, qt), qt)
        assert np.allclose(simulate(w, 32, asym), real, atol=1e-6), qt
    print("Part 1: 4-bit block rules and group sizes on random [1024, 4096] weights")
    print(f"{'rule':<11}{'group':>6}{'bits/w':>8}  " + "  ".join(f"{m + ' w-err':>18}{'Wx-err':>9}" for m in mats))
    for asym in (False, True):
        for g in (16, 32, 64, 128):
            bpw = 4 + 16 / g * (2 if asym else 1)
            cells = []
            for w in mats.values():
                wh = simulate(w, g, asym)
                werr = np.linalg.norm(w - wh) / np.linalg.norm(w)
                yerr = np.linalg.norm(w @ x - wh @ x) / np.linalg.norm(w @ x)
                cells.append(f"{werr:>18.4f}{yerr:>9.4f}")
            name = "asym(q4_1)" if asym else "sym(q4_0)"
            print(f"{name:<11}{g:>6}{bpw:>8.2f}  " + "  ".join(cells))


def baby_table() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import mixcli
    from babymodels import make_hf_checkpoint
    from babytrain import corpus_tokens, train_checkpoint
    from quant.convert import convert_checkpoint

    print("\nPart 2: trained babies (tests/test_model_parity.py's), greedy agreement / mean KL vs transformers")
    print(f"{'model':<14}{'quant':<7}{'bits/w':>7}{'passage agree':>15}{'KL':>9}{'random agree':>14}{'KL':>9}")
    cases = [("mixtral", {}), ("llama", {}), ("mixtral", {"tied": True})]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, kw) in enumerate(cases):
            src = make_hf_checkpoint(Path(tmp) / f"hf{i}", kind, dtype="f16", seed=10 + i, **kw)
            train_checkpoint(src, steps=300, seed=i, text_tokens=400)
            ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            seqs = [corpus_tokens(100)[100:164].tolist(), np.random.default_rng(i).integers(0, 100, 64).tolist()]
            with torch.no_grad():
                refs = [ref(torch.tensor([s])).logits[0].numpy() for s in seqs]
            for qt in ("q4_0", "q4_1", "q8_0"):
                out = Path(tmp) / f"c{i}-{qt}"
                summary = convert_checkpoint(src, out, quant=qt)
                model = mixcli.load(out, ctx=128)
                cells = []
                for s, r in zip(seqs, refs):
                    ours = model.logits(s)
                    cells.append(f"{(ours.argmax(-1) == r.argmax(-1)).mean():>14.1%}{_kl(r, ours):>9.4f}")
                name = kind + ("-tied" if kw else "")
                print(f"{name:<14}{qt:<7}{summary.bits_per_weight:>7.2f} " + "".join(cells))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    def logsm(z):
        z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    lp, lq = logsm(p), logsm(q)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-babies", action="store_true", help="only the weight-error table (no torch)")
    args = ap.parse_args()
    weight_table()
    if not args.skip_babies:
        baby_table()


if __name__ == "__main__":
    main()

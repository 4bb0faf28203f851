"""Decode attention, us per call: the kernel before kernels/attn.py (kept below as ``old_attention``, one
(token, head) pair at a time, libm exp per score) against ``kernels.attn.attention``
(a kv head's query group at a time), measured alternately in one
process, at each thread count.

One query token (T = 1) against n cached positions of a float16 KV cache, H = 32 query heads
over KVH = 8 kv heads of HD = 128 by default (Llama-3-8B / Mistral-7B). Each call reads
n * KVH * HD * 4 bytes of K and V; the calls cycle through enough layers' caches (>= 64 MiB) that
they stream from DRAM, not from the 32 MiB L3, as a real model's decode does. Each figure is the
median over several passes (each pass: every layer once per kernel, old and new in turn).
``--prefill T`` adds rows for T query tokens at pos0 = n - T (scratch [T*H, n], the model's
prefill call).

    python benchmarks/attention.py [--threads 1,2] [--n 32,128,512,2048,4096] [--runs 7]
                                   [--heads 32 --kv-heads 8 --head-dim 128] [--prefill 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from numba import njit, prange

from mixcli.kernels import attn
from mixcli.kernels.irgen import _u16, h2f


# The baseline: mixcli's attention up to the commit that added kernels_attn.py (now kernels/attn.py), verbatim but for
# cache=False (its name must not meet the product's cache entries).
@njit(fastmath=True, nogil=True)
def _old_attend_one(q, kc, vc, n, scale, out, sc):
    HD = q.shape[0]
    mx = np.float32(-np.inf)
    for j in range(n):
        s = np.float32(0.0)
        for i in range(HD):
            s += q[i] * h2f(kc[j, i])
        s *= scale
        sc[j] = s
        mx = max(mx, s)
    tot = np.float32(0.0)
    for j in range(n):
        e = np.exp(sc[j] - mx)
        sc[j] = e
        tot += e
    for i in range(HD):
        out[i] = 0.0
    for j in range(n):
        p = sc[j]
        for i in range(HD):
            out[i] += p * h2f(vc[j, i])
    inv = np.float32(1.0) / tot
    for i in range(HD):
        out[i] *= inv


@njit(fastmath=True, nogil=True, parallel=True)
def _old_attention(q, kc, vc, pos0, scale, out, scratch):
    T, H, HD = q.shape
    grp = H // kc.shape[0]
    sc = np.float32(scale)
    if scratch.shape[0] >= T * H:
        for th in prange(T * H):
            t = th // H
            h = th - t * H
            _old_attend_one(q[t, h], kc[h // grp], vc[h // grp], pos0 + t + 1, sc, out[t, h], scratch[th])
    else:
        for h in prange(H):
            for t in range(T):
                _old_attend_one(q[t, h], kc[h // grp], vc[h // grp], pos0 + t + 1, sc, out[t, h], scratch[h])


def old_attention(q, k_cache, v_cache, pos0, scale, out, scratch):
    _old_attention(q, _u16(k_cache), _u16(v_cache), pos0, scale, out, scratch)


STREAM_BYTES = 64 << 20
PASS_S = 0.01  # a timed pass repeats the layer cycle until it lasts about this long


def _passes(fns, layers, args_of, runs: int) -> list[float]:
    """Median seconds per call of each fn over `runs` passes; within a pass the fns take turns,
    each cycling through every layer (repeated to last about PASS_S)."""
    for fn in fns:  # compile (or load the cache) and warm
        for lay in layers:
            fn(*args_of(lay))
    t = time.perf_counter()
    for lay in layers:
        fns[-1](*args_of(lay))
    one = (time.perf_counter() - t) / len(layers)
    reps = max(1, int(PASS_S / max(one, 1e-7) / len(layers)))
    ts = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            for _ in range(reps):
                for lay in layers:
                    fn(*args_of(lay))
            ts[i].append((time.perf_counter() - t) / (reps * len(layers)))
    return [float(np.median(x)) for x in ts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--n", default="32,128,512,2048,4096", help="comma-separated cached positions")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=0, help="also time T query tokens (0: decode only)")
    a = ap.parse_args()
    H, KVH, HD = a.heads, a.kv_heads, a.head_dim
    ns = [int(v) for v in a.n.split(",")]
    threads = [int(v) for v in a.threads.split(",") if int(v) <= numba.config.NUMBA_NUM_THREADS]
    S = max(ns) + 1
    layer_bytes = 2 * KVH * S * HD * 2
    nlayers = max(2, -(-STREAM_BYTES // layer_bytes))
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((KVH, S, HD)).astype(np.float16), rng.standard_normal((KVH, S, HD)).astype(np.float16))
        for _ in range(nlayers)
    ]
    scale = HD**-0.5
    print(
        f"numba {numba.__version__}, threads available {numba.config.NUMBA_NUM_THREADS}; "
        f"H={H} KVH={KVH} HD={HD}, float16 cache, {nlayers} layers x {layer_bytes >> 20} MiB"
    )
    fns = (old_attention, attn.attention)
    rows = []
    for T in [1] + ([a.prefill] if a.prefill else []):
        q = rng.standard_normal((T, H, HD)).astype(np.float32)
        out = np.empty((T, H, HD), np.float32)
        for n in ns:
            if n < T:
                continue
            scratch = np.empty((H, S) if T == 1 else (T * H, n), np.float32)
            for th in threads:
                numba.set_num_threads(th)
                old, new = _passes(fns, layers, lambda lay: (q, lay[0], lay[1], n - T, scale, out, scratch), a.runs)
                gbs = n * KVH * HD * 4 / new / 1e9 if T == 1 else 0.0  # decode reads K and V once per call
                rows.append((T, n, th, old * 1e6, new * 1e6, old / new, gbs))
    print(f"{'T':>5}{'n':>7}{'thr':>5}{'old us':>11}{'new us':>11}{'old/new':>9}{'new K+V GB/s':>14}")
    for T, n, th, old, new, ratio, gbs in rows:
        print(f"{T:>5}{n:>7}{th:>5}{old:>11.1f}{new:>11.1f}{ratio:>9.2f}" + (f"{gbs:>14.1f}" if gbs else f"{'-':>14}"))


if __name__ == "__main__":
    main()

"""Routing: crafted router weights force known experts; exactly those are read, and their outputs
are combined with the softmax weights renormalised over the chosen two."""

from __future__ import annotations

import numpy as np
import pytest

import mixcli
from babymodels import make_hf_checkpoint
from quant.convert import convert_checkpoint


class RecordingExperts:
    """Wraps the model's expert provider and records every (layer, expert) it hands out."""

    def __init__(self, inner):
        self.inner = inner
        self.stats = inner.stats
        self.calls: list[tuple[int, int, int]] = []

    def attach(self, model):
        self.inner.attach(model)

    def on_route(self, layer, x, experts):
        self.inner.on_route(layer, x, experts)

    def get(self, layer, expert, n_tokens):
        self.calls.append((layer, expert, n_tokens))
        return self.inner.get(layer, expert, n_tokens)


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    base = tmp_path_factory.mktemp("routing")
    src = make_hf_checkpoint(base / "hf", "mixtral", dtype="f32", seed=3)
    out = base / "f16"
    convert_checkpoint(src, out, quant="f16")
    return out


def _expert_ref(model, layer, e, x):
    """Numpy SwiGLU of one expert from its dequantized weights: x [T, D] -> [T, D]."""
    t = model.store.tensor
    p = f"layers.{layer}.experts.{e}."
    w1, w3, w2 = (t(p + n).dequantize().astype(np.float64) for n in ("w1", "w3", "w2"))
    a = x @ w1.T
    return ((a / (1 + np.exp(-a))) * (x @ w3.T)) @ w2.T


@pytest.mark.parametrize("T", [1, 5])
def test_forced_router_reads_and_combines_exactly_the_chosen_experts(baby, T):
    model = mixcli.load(baby, ctx=64)
    rec = RecordingExperts(model.experts)
    model.experts = rec
    D = model.config.hidden_size
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((T, D)).astype(np.float32)
    # gate [E, D] chosen so every token's router logits are exactly target [E]
    target = np.array([0.0, 3.0, -1.0, 2.0], np.float32)
    u = rng.standard_normal(D).astype(np.float32)
    xb = xb - np.outer(xb @ u, u) / (u @ u)  # every token orthogonal to u ...
    xb += u[None, :]  # ... plus exactly u, so gate @ x = target when gate = outer(target, u)/|u|^2
    moe = model.layers[0].moe
    moe.gate = np.ascontiguousarray(np.outer(target, u) / (u @ u), dtype=np.float32)
    got = moe(xb, model.run_state(T)).copy()  # [T, D]

    assert sorted({e for (_, e, _) in rec.calls}) == [1, 3]
    assert all(n == T for (_, _, n) in rec.calls) and len(rec.calls) == 2
    w = np.exp(target[[1, 3]]) / np.exp(target[[1, 3]]).sum()  # renormalised top-2 softmax
    want = w[0] * _expert_ref(model, 0, 1, xb.astype(np.float64)) + w[1] * _expert_ref(
        model, 0, 3, xb.astype(np.float64)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_decode_touches_only_two_experts_per_layer(baby):
    model = mixcli.load(baby, ctx=64)
    model.prefill([1, 2, 3])
    model.experts.stats.reset()
    model.decode(4)
    touched = model.experts.stats.touched  # [L, E]
    assert (touched.sum(axis=1) == model.config.num_experts_per_tok).all()
    region = model.store.experts[(0, 0)].nbytes
    assert model.experts.stats.bytes_read == region * model.config.num_hidden_layers * model.config.num_experts_per_tok


def test_every_provider_implements_the_protocol(baby):
    """The plain mapping, the expert cache and the `mixcli experts` recorder all offer the hooks
    the MoE layer calls (``ExpertProvider``); a provider missing ``on_route`` is not one."""
    from mixcli.commands.experts import RouterRecorder
    from mixcli.expert_cache import ExpertCache, memory_for_slots
    from mixcli.experts import ExpertProvider

    model = mixcli.load(baby, ctx=64)
    cache = ExpertCache(model.store, None, memory_for_slots(model.store, 2), prefetch=False)
    for p in (model.experts, cache, RouterRecorder(cache, 2, 2), RecordingExperts(model.experts)):
        assert isinstance(p, ExpertProvider), type(p).__name__

    class GetOnly:
        stats = model.experts.stats

        def get(self, layer, expert, n_tokens):
            return model.experts.get(layer, expert, n_tokens)

    assert not isinstance(GetOnly(), ExpertProvider)

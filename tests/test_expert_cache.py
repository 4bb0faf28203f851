"""The expert cache: same logits as plain mapping under a budget that fits only some experts, never
more bytes than the budget, prefetch guesses that the counters score correctly, and loader
failures that end in a clear error instead of a hang. The reference for every logit is the
memory-mapped provider (MappedExperts), which reads the weights straight from the file."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

import mixcli
from babymodels import make_hf_checkpoint
from mixcli import expert_reader
from mixcli.errors import MixcliError, UsageError
from mixcli.expert_cache import ExpertCache, ExpertLoadError, make_expert_provider, memory_for_slots
from mixcli.expert_policy import ReplacementPolicy, replay
from mixcli.experts import MappedExperts
from mixcli.memsize import parse_size
from mixcli.model import Model
from mixcli.store import open_model_dir
from quant.convert import convert_checkpoint

LAYERS, EXPERTS = 4, 8
PROMPT = [1, 17, 42, 5, 99, 23, 8, 64, 31, 77, 12]


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    src = make_hf_checkpoint(
        base / "hf", "mixtral", dtype="f32", seed=11, num_hidden_layers=LAYERS, num_local_experts=EXPERTS
    )
    out = base / "q4"
    convert_checkpoint(src, out, quant="q4_0")
    return out


def _cached(path, n_slots, **kw):
    store = open_model_dir(path)
    cache = ExpertCache(store, None, memory_for_slots(store, n_slots), **kw)
    return Model(store, ctx=64, batch=4, experts=cache), cache


def _run(model, steps=8):
    """Batched prefill (batch 4 < prompt: several T > 1 calls) then greedy decode; all logits."""
    out = [model.logits(PROMPT)]
    tok = int(out[0][-1].argmax())
    for _ in range(steps):
        lg = model.decode(tok).copy()
        out.append(lg[None, :])
        tok = int(lg.argmax())
    return np.concatenate(out)


def _timeout_call(fn, seconds=60):
    """Run fn in a thread; return (result, exception); fail the test if it does not finish."""
    box = {}

    def target():
        try:
            box["r"] = fn()
        except BaseException as exc:  # handed to the test
            box["e"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"call did not finish within {seconds} s (a hang)"
    return box.get("r"), box.get("e")


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("policy", ["next", "lfu", "lru"])
@pytest.mark.parametrize("direct", [True, False])  # O_DIRECT reads, or buffered reads + DONTNEED
def test_budget_gives_exactly_the_unbudgeted_logits(baby, prefetch, policy, direct):
    want = _run(mixcli.load(baby, ctx=64, batch=4))
    model, cache = _cached(baby, 5, prefetch=prefetch, policy=policy, direct=direct)  # 5 of 32 experts fit
    got = _run(model)
    assert np.array_equal(got, want)
    c = cache.cstats
    assert c.evictions > 0 and c.bytes_loaded > 5 * cache.slot_bytes  # the budget really bit
    if prefetch:
        assert c.prefetch_hits > 0
    cache.close()


def test_cache_never_holds_more_than_its_budget(baby):
    store = open_model_dir(baby)
    budget = memory_for_slots(store, 3) + 1000  # not a whole number of slots
    regions = {k: r.nbytes for k, r in store.experts.items()}
    seen = []

    class Counting(ExpertCache):
        def get(self, layer, expert, n_tokens):
            w = super().get(layer, expert, n_tokens)
            held = self.resident()
            seen.append(sum(regions[k] for k in held))  # count region bytes from the manifest
            assert (layer, expert) in held
            return w

    cache = Counting(store, None, budget, prefetch=True)
    model = Model(store, ctx=64, batch=4, experts=cache)
    _run(model, steps=12)
    nonexpert = sum(t.nbytes for n, t in store.tensors.items() if ".experts." not in n)
    assert nonexpert + cache.mapped_bytes <= budget  # the slot mapping itself fits beside the pinned weights
    assert max(seen) <= budget - nonexpert
    assert cache.cstats.peak_resident_bytes <= cache.capacity_bytes
    assert len(seen) == cache.cstats.requests
    cache.close()


def test_too_small_budget_names_the_size_that_works(baby):
    store = open_model_dir(baby)
    with pytest.raises(UsageError, match="too small") as exc:
        ExpertCache(store, None, memory_for_slots(store, 1), prefetch=False)
    size = parse_size("".join(exc.value.hint.split()[-4:-2]))  # "use --max-memory 123.45 KiB or more"
    assert abs(size - memory_for_slots(store, 2)) <= 0.01 * size
    assert ExpertCache(store, None, memory_for_slots(store, 2), prefetch=False).n_slots == 2


def test_provider_choice(baby):
    store = open_model_dir(baby)
    assert isinstance(make_expert_provider(store, None, None), MappedExperts)
    assert isinstance(make_expert_provider(store, None, 10**12), MappedExperts)  # the whole model fits
    cache = make_expert_provider(store, None, memory_for_slots(store, 4), prefetch=False)
    assert isinstance(cache, ExpertCache) and cache.n_slots == 4


def _crafted(model, rng, targets):
    """Router gates [E, D] per layer so that for inputs x = w + s*u (w orthogonal to u), layer i's
    router logits are exactly s * targets[i] [E]."""
    D = model.config.hidden_size
    u = rng.standard_normal(D).astype(np.float32)
    for i, t in targets.items():
        model.layers[i].moe.gate = np.ascontiguousarray(np.outer(t, u) / (u @ u), dtype=np.float32)
    w = rng.standard_normal((1, D)).astype(np.float32)
    w -= np.outer(w @ u, u) / (u @ u)
    return lambda s: np.ascontiguousarray(w + s * u[None, :], dtype=np.float32)  # [1, D]


@pytest.mark.parametrize("case", ["right", "wrong", "norm-sign"])
def test_prefetch_guess_is_scored_right_or_wrong(baby, case):
    model, cache = _cached(baby, 6, prefetch=True)
    rng = np.random.default_rng(5)
    t0 = np.array([3, 2, 1, 0, -1, -2, -3, -4], np.float32)  # layer 0 picks experts 0, 1
    t1 = np.array([-4, -3, 5, -2, 4, -1, 0, 1], np.float32)  # layer 1 on the same input: 2, 4
    x = _crafted(model, rng, {0: t0, 1: t1})
    D = model.config.hidden_size
    model.layers[0].ffn_norm = np.ones(D, np.float32)
    # in "norm-sign" layer 1's norm weight flips the sign of its input: the guess must follow
    model.layers[1].ffn_norm = np.full(D, -1.0 if case == "norm-sign" else 1.0, np.float32)
    cache.attach(model)  # re-read the crafted gates and norms
    st = model.run_state(1)
    model.layers[0].moe(x(1.0), st)
    assert cache.wait_idle(30)
    before = cache.cstats.guess_hits
    misses = cache.cstats.misses
    # what layer 1 actually sees: the same input (right: experts 2, 4 as guessed), its opposite
    # (wrong: -t1 picks 0, 1), or the input its sign-flipping norm produces (norm-sign: 0, 1,
    # which only the norm-corrected guess foresees)
    x1 = {"right": x(1.0), "wrong": x(-1.0), "norm-sign": x(-1.0)}[case]
    model.layers[1].moe(x1, st)
    c = cache.cstats
    assert c.predicted == 2
    if case == "right":
        assert c.predicted_right == 2 and c.predicted_right_raw == 2
        assert c.guess_hits - before == 2 and c.misses == misses  # both read ahead: no wait
    elif case == "wrong":
        assert c.predicted_right == 0 and c.predicted_right_raw == 0
        assert c.guess_hits == before
        assert c.bytes_wasted >= 2 * model.store.experts[(1, 2)].nbytes  # the two guesses went unused
    else:
        assert c.predicted_right == 2 and c.predicted_right_raw == 0
        assert c.guess_hits - before == 2 and c.misses == misses
    cache.close()


def test_guesses_that_keep_missing_are_no_longer_read(baby):
    """A layer whose guesses keep coming out wrong stops costing reads (its running accuracy fell
    below predictor.GUESS_MIN_ACCURACY); it is still guessed and scored, and once the guesses come
    right again they are read ahead again."""
    from mixcli.expert_predictor import GUESS_MIN_ACCURACY

    model, cache = _cached(baby, 6, prefetch=True)
    rng = np.random.default_rng(5)
    t0 = np.array([3, 2, 1, 0, -1, -2, -3, -4], np.float32)
    t1 = np.array([-4, -3, 5, -2, 4, -1, 0, 1], np.float32)
    x = _crafted(model, rng, {0: t0, 1: t1})
    D = model.config.hidden_size
    model.layers[0].ffn_norm = np.ones(D, np.float32)
    model.layers[1].ffn_norm = np.ones(D, np.float32)
    cache.attach(model)
    st = model.run_state(1)

    def token(sign):  # layer 0 guesses 2, 4 for layer 1; layer 1 sees x(sign): right if +1
        model.layers[0].moe(x(1.0), st)
        assert cache.wait_idle(30)
        model.layers[1].moe(x(sign), st)
        assert cache.wait_idle(30)

    wasted = []
    for _ in range(12):
        token(-1.0)
        wasted.append(cache.cstats.bytes_wasted)
    c = cache.cstats
    assert c.predicted == 24 and c.predicted_right == 0  # every guess still made and scored
    assert c.guesses_skipped > 0 and cache.predictor.accuracy[1] < GUESS_MIN_ACCURACY
    assert wasted[0] > 0 and wasted[-1] == wasted[-4]  # no more reads wasted once it stopped
    for _ in range(6):
        token(1.0)
    assert cache.predictor.trusted(1)  # right again: trusted again
    skipped = c.guesses_skipped
    token(1.0)
    token(1.0)
    assert c.guesses_skipped == skipped and c.predicted_right == 2 * 8  # read ahead, and right
    cache.close()


@pytest.mark.parametrize("failure", ["oserror", "bug"])
def test_loader_thread_failure_is_a_clear_error_not_a_hang(baby, monkeypatch, failure):
    model, cache = _cached(baby, 5, prefetch=True)
    real = expert_reader.pread_into

    def flaky(fd, buf, offset):
        if threading.current_thread().name == "mixcli-expert-loader":
            if failure == "oserror":
                raise OSError(errno.EIO, "Input/output error")
            raise RuntimeError("loader bug")
        return real(fd, buf, offset)

    monkeypatch.setattr(expert_reader, "pread_into", flaky)
    _, err = _timeout_call(lambda: _run(model, steps=4))
    assert isinstance(err, ExpertLoadError) and isinstance(err, MixcliError)
    if failure == "oserror":
        assert "Input/output error" in str(err) and "reading expert" in str(err)
    else:
        assert "loader thread failed: RuntimeError: loader bug" in str(err)


def test_vanished_data_file_during_a_synchronous_read(baby, monkeypatch):
    """Without prefetch a read error comes from the forward pass's own read: same clear error."""
    model, cache = _cached(baby, 3, prefetch=False)

    def gone(fd, buf, offset):
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(expert_reader, "pread_into", gone)
    _, err = _timeout_call(lambda: model.logits(PROMPT[:3]))
    assert isinstance(err, ExpertLoadError) and "No such file or directory" in str(err)


def test_truncated_read_is_reported(baby, monkeypatch):
    model, cache = _cached(baby, 3, prefetch=False)
    monkeypatch.setattr(expert_reader, "pread_into", lambda fd, buf, offset: 0)  # end of file
    with pytest.raises(ExpertLoadError, match="truncated"):
        model.logits(PROMPT[:3])


@pytest.mark.parametrize("policy", ["next", "lfu", "lru"])
def test_the_cache_evicts_as_its_policy_replays(baby, policy):
    """The cache's hits on a decode equal a replay of the same routing through the pure policy
    (expert_policy.replay): the cache takes its eviction order from the policy and nowhere else."""
    from mixcli.commands.experts import RouterRecorder

    model, cache = _cached(baby, 5, prefetch=False, policy=policy)
    rec = RouterRecorder(cache, LAYERS, 2)
    model.experts = rec
    tok = 1
    for _ in range(12):
        tok = int(model.decode(tok).argmax())
    routing = np.stack(rec.choices("prompt"), axis=1)  # [N, L, K]
    assert routing.shape == (12, LAYERS, 2)
    want = replay(routing, cache.n_slots, ReplacementPolicy(policy, LAYERS, EXPERTS))
    c = cache.cstats
    assert c.hits == want and c.misses == routing.size - want and c.evictions > 0


@pytest.mark.parametrize(
    "text,want",
    [
        ("12GB", 12 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("800M", 800 * 2**20),
        ("4096", 4096),
        ("2 g", 2 * 2**30),
        ("512k", 512 * 1024),
    ],
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "twelve", "12XB", "-1G", "0", "1.2.3G", "12Gi", "GB"])
def test_parse_size_rejects_junk(text):
    with pytest.raises(UsageError, match="memory size"):
        parse_size(text)


def test_router_view_matches_what_the_model_routed(baby):
    """`mixcli experts` records top-K from the router logits; the provider's own counts (filled by
    the model's routing kernel as it hands out experts) must agree token for token."""
    from mixcli.commands.experts import RouterRecorder, routing_summary

    model = mixcli.load(baby, ctx=64, batch=4)
    rec = RouterRecorder(model.experts, LAYERS, 2)
    model.experts = rec
    model.prefill(PROMPT)
    rec.phase = "generated"
    for tok in (5, 6, 7, 5):
        model.decode(tok)
    prompt, gen = rec.choices("prompt"), rec.choices("generated")
    assert [c.shape for c in prompt] == [(len(PROMPT), 2)] * LAYERS and [c.shape for c in gen] == [(4, 2)] * LAYERS
    for li in range(LAYERS):
        both = np.concatenate([prompt[li], gen[li]])
        assert np.array_equal(np.bincount(both.ravel(), minlength=EXPERTS), rec.stats.counts[li])
        share, reuse = routing_summary(gen[li], EXPERTS)
        assert np.isclose(share.sum(), 2.0)
        pairs = [len(set(a) & set(b)) / 2 for a, b in zip(gen[li][:-1], gen[li][1:])]
        assert np.isclose(reuse, np.mean(pairs))

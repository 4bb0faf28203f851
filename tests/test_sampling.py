"""mixcli.sampling: the filtered distribution against transformers' logits processors, composed in
llama.cpp's order, plus the properties a user relies on (seeds, greedy, exact supports)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mixcli.errors import UsageError
from mixcli.sampling import SamplerConfig, filtered_probs, make_sampler


def _reference(logits: np.ndarray, history: list[int], cfg: SamplerConfig) -> np.ndarray:
    """probs [V] from transformers' processors, in llama.cpp's order, in float64."""
    scores = torch.from_numpy(logits.astype(np.float64))[None, :]  # [1, V]
    recent = history if cfg.repeat_last_n < 0 else history[-cfg.repeat_last_n :] if cfg.repeat_last_n else []
    ids = torch.tensor([recent], dtype=torch.long)  # [1, R]
    if cfg.repeat_penalty != 1.0 and recent:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repeat_penalty)(ids, scores)
    if cfg.top_k > 0:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    if cfg.min_p > 0:
        scores = MinPLogitsWarper(cfg.min_p)(ids, scores)
    scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def _random_case(rng: np.random.Generator, v: int) -> tuple[np.ndarray, list[int], SamplerConfig]:
    # spreads from flat to so peaked that the first threshold below the best logit finds too few
    logits = (rng.standard_normal(v) * rng.choice([0.3, 1.0, 4.0, 30.0])).astype(np.float32)  # [V]
    history = rng.integers(0, v, size=int(rng.integers(0, 100))).tolist()
    cfg = SamplerConfig(
        temperature=float(rng.choice([0.3, 0.8, 1.0, 1.7])),
        top_k=int(rng.choice([0, 1, 5, 40, v + 3])),
        top_p=float(rng.choice([1.0, 0.95, 0.6, 0.2])),
        min_p=float(rng.choice([0.0, 0.05, 0.2])),
        repeat_penalty=float(rng.choice([1.0, 1.1, 1.5, 0.8])),
        repeat_last_n=int(rng.choice([0, 8, 64, -1])),
    )
    return logits, history, cfg


@pytest.mark.parametrize("v", [7, 100, 1000, 32000])
def test_filtered_probs_match_transformers(v):
    rng = np.random.default_rng(v)
    for _ in range(60 if v < 32000 else 8):
        logits, history, cfg = _random_case(rng, v)
        ours = filtered_probs(logits, history, cfg)
        ref = _reference(logits, history, cfg)
        assert np.array_equal(ours > 0, ref > 0), cfg
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


# a crafted distribution: probabilities 0.5, 0.25, 0.12, 0.08, 0.05 on shuffled token ids
CRAFTED_P = np.array([0.5, 0.25, 0.12, 0.08, 0.05])
PERM = np.array([3, 0, 4, 1, 2])  # token PERM[r] has the r-th largest probability


def _crafted_logits() -> np.ndarray:
    logits = np.empty(5, dtype=np.float32)
    logits[PERM] = np.log(CRAFTED_P)
    return logits


@pytest.mark.parametrize(
    "knobs, ranks",
    [
        ({"top_p": 0.70}, 2),  # 0.5 < 0.7 <= 0.75
        ({"top_p": 0.80}, 3),  # 0.75 < 0.8 <= 0.87
        ({"top_p": 0.90}, 4),  # 0.87 < 0.9 <= 0.95
        ({"min_p": 0.30}, 2),  # keep p >= 0.15
        ({"min_p": 0.20}, 3),  # keep p >= 0.10
        ({"min_p": 0.09}, 5),  # keep p >= 0.045
        ({"top_k": 2}, 2),
        # top-p sees the top-4 renormalised: cumulative .5/.95=.53, .75/.95=.79, .87/.95=.92
        ({"top_k": 4, "top_p": 0.9}, 3),
        ({"top_p": 0.9, "min_p": 0.2}, 3),  # the stricter of the two wins
    ],
)
def test_top_p_and_min_p_support_on_crafted_distribution(knobs, ranks):
    cfg = SamplerConfig(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **knobs})
    probs = filtered_probs(_crafted_logits(), [], cfg)
    assert set(np.flatnonzero(probs)) == set(PERM[:ranks].tolist())
    # temperature 1: the survivors keep their relative odds
    np.testing.assert_allclose(probs[PERM[:ranks]], CRAFTED_P[:ranks] / CRAFTED_P[:ranks].sum(), rtol=1e-6)


def test_temperature_reshapes_but_does_not_change_the_support():
    base = dict(top_k=0, top_p=0.8, min_p=0.0)
    hot = filtered_probs(_crafted_logits(), [], SamplerConfig(temperature=5.0, **base))
    cold = filtered_probs(_crafted_logits(), [], SamplerConfig(temperature=0.2, **base))
    assert set(np.flatnonzero(hot)) == set(np.flatnonzero(cold)) == set(PERM[:3].tolist())
    assert cold[PERM[0]] > 0.95 and hot[PERM[0]] < 0.5


def test_repetition_penalty_follows_llama_cpp_rule():
    """Positive logits are divided, negative ones multiplied; only the last n tokens count, once each."""
    logits = np.array([2.0, -1.0, 0.5, -3.0, 1.0, 0.0], dtype=np.float32)
    history = [4, 0, 1, 1, 0, 2]  # token 4 falls outside repeat_last_n=5; 0 and 1 repeat
    cfg = SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0, repeat_last_n=5)
    expect = np.array([2.0 / 2, -1.0 * 2, 0.5 / 2, -3.0, 1.0, 0.0])
    e = np.exp(expect - expect.max())
    np.testing.assert_allclose(filtered_probs(logits, history, cfg), e / e.sum(), rtol=1e-12)
    np.testing.assert_allclose(filtered_probs(logits, history, cfg), _reference(logits, history, cfg), rtol=1e-12)


def test_repetition_penalty_can_change_the_greedy_choice():
    logits = np.array([3.0, 2.9, -5.0], dtype=np.float32)
    greedy = SamplerConfig(temperature=0.0, repeat_penalty=1.3)
    assert make_sampler(greedy)(logits, []) == 0
    assert make_sampler(greedy)(logits, [0]) == 1
    assert make_sampler(dataclasses.replace(greedy, repeat_last_n=0))(logits, [0]) == 0


def test_temperature_zero_is_argmax_and_top_k_one_is_greedy():
    rng = np.random.default_rng(7)
    greedy = make_sampler(SamplerConfig(temperature=0.0, seed=1))
    top1 = make_sampler(SamplerConfig(temperature=1.5, top_k=1, top_p=0.5, min_p=0.0, seed=2))
    for _ in range(50):
        logits = rng.standard_normal(32000).astype(np.float32)
        hist = rng.integers(0, 32000, size=20).tolist()
        want = int(np.argmax(logits))
        assert greedy(logits, []) == want == top1(logits, [])
        pen = SamplerConfig(temperature=0.0, repeat_penalty=1.2)
        assert make_sampler(pen)(logits, hist) == make_sampler(dataclasses.replace(pen, temperature=0.9, top_k=1))(
            logits, hist
        )
        assert filtered_probs(logits, [], SamplerConfig(temperature=0.0))[want] == 1.0


def test_same_seed_same_tokens():
    rng = np.random.default_rng(3)
    steps = [(rng.standard_normal(1000).astype(np.float32)) for _ in range(100)]
    cfg = SamplerConfig(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=1234)

    def run(c):
        s, hist = make_sampler(c), []
        for logits in steps:
            hist.append(s(logits, hist))
        return hist

    a, b = run(cfg), run(cfg)
    assert a == b
    assert run(dataclasses.replace(cfg, seed=4321)) != a
    assert len(set(a)) > 20  # it really samples, not argmax


def test_draws_follow_the_filtered_distribution():
    logits = _crafted_logits()
    cfg = SamplerConfig(temperature=0.7, top_k=0, top_p=0.9, min_p=0.0, seed=99)
    want = filtered_probs(logits, [], cfg)
    sample = make_sampler(cfg)
    n = 20000
    counts = np.bincount([sample(logits, []) for _ in range(n)], minlength=5)
    assert counts[want == 0].sum() == 0
    # 4 standard errors of a binomial proportion, at most ~0.0141 here
    np.testing.assert_allclose(counts / n, want, atol=4 * np.sqrt(0.25 / n))


def test_logits_are_not_modified():
    logits = np.linspace(-2, 2, 50).astype(np.float32)
    before = logits.copy()
    make_sampler(SamplerConfig(repeat_penalty=1.5, seed=0))(logits, list(range(50)))
    filtered_probs(logits, list(range(50)), SamplerConfig(repeat_penalty=1.5))
    assert np.array_equal(logits, before)


def test_defaults_are_valid():
    assert make_sampler(SamplerConfig()) is not None
    assert SamplerConfig().validate() == SamplerConfig()


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"min_p": -0.01},
        {"min_p": 1.5},
        {"top_k": -1},
        {"repeat_penalty": 0.0},
        {"repeat_penalty": -1.0},
        {"repeat_last_n": -2},
        {"seed": -5},
    ],
)
def test_bad_values_raise_usage_error(bad):
    cfg = SamplerConfig(**bad)
    with pytest.raises(UsageError) as err:
        cfg.validate()
    assert next(iter(bad)) in str(err.value)
    with pytest.raises(UsageError):
        make_sampler(cfg)

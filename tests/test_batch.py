"""Batched multi-sequence decoding (mixcli/batch.py) against the single-sequence model path.

Four sequences of different lengths join at different steps, one prefilling while others decode;
every logit row must match what ``Model.prefill`` / ``Model.decode`` give for that sequence alone.
The difference is float rounding only (the batch runs the matmul kernels over T rows where decode
runs the matvec kernels, and the MoE sums experts in another order): measured at about 4e-7 of
logits up to 1.8 on the baby model. The bound is the one the incremental-decode test uses.
"""

from __future__ import annotations

import numpy as np
import pytest

import mixcli
from babyruntime import baby_chat_model
from mixcli.batch import BatchDecoder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return mixcli.load(baby_chat_model(tmp_path_factory.mktemp("batch")), ctx=256)


def test_batched_steps_equal_each_sequence_alone(model):
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    prompts = [[int(t) for t in rng.integers(3, V, size=n)] for n in (5, 9, 13, 7)]
    feeds = [[int(t) for t in rng.integers(3, V, size=6)] for _ in prompts]
    alone = []
    for p, f in zip(prompts, feeds):
        model.reset()
        alone.append(np.array([model.prefill(p).copy()] + [model.decode(t).copy() for t in f]))  # [7, V]

    bd = BatchDecoder(model, 4)
    got = [[] for _ in prompts]
    fed = [0] * 4

    def run(work):
        for (i, _), row in zip(work, bd.step(work)):
            got[i].append(row.copy())

    run([(0, prompts[0])])
    run([(0, [feeds[0][0]]), (1, prompts[1])])  # slot 0 decodes while slot 1 prefills
    fed[0] = 1
    run([(2, prompts[2]), (3, prompts[3])])
    while min(fed) < 6:
        work = [(i, [feeds[i][fed[i]]]) for i in range(4) if fed[i] < 6]
        run(work)
        for i, _ in work:
            fed[i] += 1
    for i in range(4):
        ours = np.array(got[i])
        assert ours.shape == alone[i].shape
        np.testing.assert_allclose(ours, alone[i], rtol=0, atol=2e-4 * np.abs(alone[i]).max())
        assert (ours.argmax(1) == alone[i].argmax(1)).all()
        assert bd.slots[i].tokens == prompts[i] + feeds[i]


def test_pick_slot_prefers_the_longest_cached_prefix(model):
    bd = BatchDecoder(model, 3)
    bd.step([(0, [5, 6, 7, 8]), (1, [5, 6, 9]), (2, [10])])
    assert bd.pick_slot([5, 6, 7, 8, 20], [0, 1, 2]) == (0, 4)
    assert bd.slots[0].tokens == [5, 6, 7, 8]
    assert bd.pick_slot([5, 6, 9, 1], [1, 2]) == (1, 3)
    # the whole prompt cached: one token still runs to give fresh logits
    assert bd.pick_slot([10], [2]) == (2, 0) and bd.slots[2].tokens == []


def test_step_refuses_what_does_not_fit(model):
    bd = BatchDecoder(model, 1, ctx=8)
    with pytest.raises(mixcli.errors.UsageError, match="do not fit the context of 8"):
        bd.step([(0, list(range(3, 12)))])
    with pytest.raises(mixcli.errors.UsageError, match="out of range"):
        bd.step([(0, [model.config.vocab_size])])

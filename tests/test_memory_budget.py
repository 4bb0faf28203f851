"""The automatic memory budget: the room a process has under cgroup v1 / v2 limits (fake
/sys/fs/cgroup trees), the rule that picks a budget, and what `load_runtime_model` does with it
(expert cache sized from it, the KV cache counted inside it, one line on stderr; --max-memory 0 and
--mmap keep plain mapping)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from babymodels import make_hf_checkpoint
from mixcli import memory_budget as mb
from mixcli.errors import UsageError
from mixcli.expert_cache import ExpertCache, memory_for_slots, slot_bytes
from mixcli.experts import MappedExperts
from mixcli.kv_cache import kv_cache_bytes
from mixcli.runtime import load_runtime_model
from mixcli.store import model_bytes, open_model_dir
from quant.convert import convert_checkpoint

GiB = 1 << 30


def _write(d: Path, **files: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)
    return d


def _meminfo(tmp_path: Path, avail: int) -> Path:
    p = tmp_path / "meminfo"
    p.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {avail // 1024} kB\n")
    return p


def test_v2_limit_minus_unreclaimable_usage(tmp_path):
    root = tmp_path / "cg"
    _write(
        root / "user.slice" / "job",
        memory__max=str(16 * GiB),
        memory__current=str(5 * GiB),
        memory__stat=f"anon 100\ninactive_file {2 * GiB}\nactive_file {GiB // 2}\nshmem 9\n",
    )
    lims = mb.cgroup_limits(root, "0::/user.slice/job\n")
    assert [c.limit for c in lims] == [16 * GiB]
    assert lims[0].room == 16 * GiB - GiB * 5 // 2  # 5 GiB used, 2.5 GiB of it page cache
    assert mb.available_memory(root, "0::/user.slice/job\n", _meminfo(tmp_path, 20 * GiB)) == GiB * 27 // 2
    assert mb.available_memory(root, "0::/user.slice/job\n", _meminfo(tmp_path, 4 * GiB)) == 4 * GiB


def test_v2_parent_limit_applies_and_max_means_none(tmp_path):
    root = tmp_path / "cg"
    _write(root / "a", memory__max=str(8 * GiB), memory__current=str(1 * GiB))
    _write(root / "a" / "b", memory__max="max\n", memory__current=str(1 * GiB))
    lims = mb.cgroup_limits(root, "0::/a/b\n")
    assert [c.path.name for c in lims] == ["a"] and lims[0].room == 7 * GiB
    assert mb.cgroup_limits(root, "0::/\n") == []  # the root has no memory.max


def test_v2_namespace_path_missing_falls_back_to_the_mount(tmp_path):
    root = _write(tmp_path / "cg", memory__max=str(12 * GiB), memory__current="0")
    lims = mb.cgroup_limits(root, "0::/some/host/path\n")  # a cgroup namespace hides the host's path
    assert [c.limit for c in lims] == [12 * GiB]


def test_v1_and_hybrid(tmp_path):
    root = tmp_path / "cg"
    mem = root / "memory"
    _write(mem, memory__limit_in_bytes="9223372036854771712", memory__usage_in_bytes=str(3 * GiB))
    _write(
        mem / "docker" / "abc",
        memory__limit_in_bytes=str(12 * GiB),
        memory__usage_in_bytes=str(4 * GiB),
        memory__stat=f"cache 5\ntotal_inactive_file {1 * GiB}\ninactive_file 99\ntotal_active_file 0\n",
    )
    _write(root / "unified")  # hybrid: v2 mounted too, but without the memory controller
    text = "4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"
    lims = mb.cgroup_limits(root, text)
    assert [c.limit for c in lims] == [12 * GiB]  # the unlimited v1 root is no limit
    assert lims[0].room == 12 * GiB - 3 * GiB
    assert mb.available_memory(root, text, _meminfo(tmp_path, 30 * GiB)) == 9 * GiB


def test_no_cgroup_information(tmp_path):
    assert mb.cgroup_limits(tmp_path / "nothing", "0::/\n") == []
    assert mb.available_memory(tmp_path / "nothing", "", _meminfo(tmp_path, 6 * GiB)) == 6 * GiB
    assert mb.available_memory(tmp_path / "nothing", "", tmp_path / "no-meminfo") is None


def test_auto_budget_rule():
    assert mb.auto_budget(10 * GiB, 1 * GiB, None) is None  # unknown room: no guess
    assert mb.auto_budget(8 * GiB, 1 * GiB, 10 * GiB) is None  # fits in 90%: plain mapping
    assert mb.auto_budget(26 * GiB, 1 * GiB, 16 * GiB) == 16 * GiB - int(1.6 * GiB)  # 10% headroom
    assert mb.auto_budget(26 * GiB, 0, 4 * GiB) == 3 * GiB  # at least 1 GiB of headroom
    assert mb.auto_budget(26 * GiB, 0, GiB // 2) == 0


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    base = tmp_path_factory.mktemp("budget")
    src = make_hf_checkpoint(
        base / "hf", "mixtral", dtype="f32", seed=3, num_hidden_layers=2, num_local_experts=8, head_dim=32
    )  # q8_0 KV blocks need a multiple of 32
    out = base / "q4"
    convert_checkpoint(src, out, quant="q4_0")
    return out


def _room_for(baby, n_slots: int, kv: int) -> int:
    """An available-memory figure whose automatic budget holds the KV cache and n_slots experts."""
    store = open_model_dir(baby)
    return math.ceil((memory_for_slots(store, n_slots) + kv + slot_bytes(store) // 2) / (1 - mb.HEADROOM_FRACTION))


def test_runtime_picks_a_budget_when_the_model_does_not_fit(baby, monkeypatch):
    ctx = 256
    kv = kv_cache_bytes(open_model_dir(baby).config, ctx)
    monkeypatch.setattr(mb, "MIN_HEADROOM", 0)
    monkeypatch.setattr(mb, "available_memory", lambda *a, **k: _room_for(baby, 3, kv))
    notes = []
    m, _ = load_runtime_model(str(baby), ctx=ctx, threads=1, notify=notes.append)
    assert isinstance(m.experts, ExpertCache) and m.experts.n_slots == 3
    assert m.store.load == "mmap"
    line = [n for n in notes if "memory budget" in n]
    assert len(line) == 1 and "\n" not in line[0], notes
    assert "3 of 16 experts cached" in line[0] and "KV cache" in line[0] and "--mmap" in line[0]
    # the KV cache counts inside the budget: a q8_0 cache (53% of f16) leaves room for more experts
    m, _ = load_runtime_model(str(baby), ctx=ctx, threads=1, notify=notes.append, kv_type="q8_0")
    assert isinstance(m.experts, ExpertCache) and m.experts.n_slots > 3
    # --max-memory 0 and --mmap: plain mapping, nothing said
    for kw in ({"max_memory": "0"}, {"mmap": True}):
        notes.clear()
        m, _ = load_runtime_model(str(baby), ctx=ctx, threads=1, notify=notes.append, **kw)
        assert isinstance(m.experts, MappedExperts) and not any("budget" in n for n in notes), (kw, notes)


def test_automatic_budget_too_small_maps_and_says_so(baby, monkeypatch):
    monkeypatch.setattr(mb, "available_memory", lambda *a, **k: model_bytes(baby) // 2)
    notes = []
    m, _ = load_runtime_model(str(baby), ctx=64, threads=1, notify=notes.append)
    assert isinstance(m.experts, MappedExperts)
    assert any("too small for the expert cache" in n and "mapping the whole model" in n for n in notes), notes


def test_model_that_fits_gets_no_budget(baby, monkeypatch):
    monkeypatch.setattr(mb, "available_memory", lambda *a, **k: 100 * model_bytes(baby))
    notes = []
    m, _ = load_runtime_model(str(baby), ctx=64, threads=1, notify=notes.append)
    assert isinstance(m.experts, MappedExperts) and not any("budget" in n for n in notes)


def test_explicit_budget_counts_the_kv_cache(baby):
    store = open_model_dir(baby)
    budget = memory_for_slots(store, 2)  # exactly 2 experts' room if the KV cache were free
    with pytest.raises(UsageError, match="KV cache") as exc:
        load_runtime_model(str(baby), ctx=256, threads=1, max_memory=str(budget))
    assert "--kv-type q8_0" in exc.value.hint or "--ctx" in exc.value.hint
    kv = kv_cache_bytes(store.config, 256)
    m, _ = load_runtime_model(str(baby), ctx=256, threads=1, max_memory=str(budget + kv))
    assert isinstance(m.experts, ExpertCache) and m.experts.n_slots == 2


def test_python_api_load_picks_the_same_budget(baby, monkeypatch, caplog):
    """``mixcli.load`` of a model that does not fit gets the CLI's automatic budget (said on the
    "mixcli" logger); load="mmap" or an explicit max_memory keep the caller's choice."""
    import logging

    import mixcli

    ctx = 256
    kv = kv_cache_bytes(open_model_dir(baby).config, ctx)
    monkeypatch.setattr(mb, "MIN_HEADROOM", 0)
    monkeypatch.setattr(mb, "available_memory", lambda *a, **k: _room_for(baby, 3, kv))
    with caplog.at_level(logging.INFO, logger="mixcli"):
        m = mixcli.load(baby, ctx=ctx, threads=1)
    assert isinstance(m.experts, ExpertCache) and m.experts.n_slots == 3
    assert any("memory budget" in r.getMessage() and "3 of 16 experts cached" in r.getMessage() for r in caplog.records)
    assert isinstance(mixcli.load(baby, ctx=ctx, threads=1, load="mmap").experts, MappedExperts)
    m = mixcli.load(baby, ctx=ctx, threads=1, max_memory=str(memory_for_slots(open_model_dir(baby), 2) + kv))
    assert isinstance(m.experts, ExpertCache) and m.experts.n_slots == 2

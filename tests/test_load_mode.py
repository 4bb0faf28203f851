"""Weights read into memory or memory-mapped (mixcli.store load modes): the same numbers either way,
the size rule that picks one, and the command-line switch."""

from __future__ import annotations

import json
import mmap as mmap_module
import os

import numba
import numpy as np
import pytest

import babyruntime
from babymodels import make_hf_checkpoint
from mixcli import store as store_mod
from mixcli.errors import ModelFormatError, UsageError
from mixcli.model import Model
from mixcli.runtime import load_runtime_model
from mixcli.store import open_model_dir, resolve_load_mode
from quant.convert import convert_checkpoint


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    base = tmp_path_factory.mktemp("load")
    src = make_hf_checkpoint(base / "hf", "mixtral", dtype="f32", seed=5, num_hidden_layers=2)
    out = base / "q4"
    convert_checkpoint(src, out, quant="q4_0")
    return out


@pytest.fixture(autouse=True)
def _keep_numba_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def _is_file_map(a: np.ndarray) -> bool:
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, mmap_module.mmap)


def test_memory_and_mmap_give_identical_logits(baby):
    """Reading the data file changes where the bytes live, not what they are: the logits of a
    prefill and of token-by-token decode are bit-identical."""
    tokens = [3, 17, 42, 5, 99, 7, 64, 1]
    out = {}
    for mode in ("memory", "mmap"):
        st = open_model_dir(baby, load=mode)
        assert st.load == mode
        part = st.tensor("layers.0.attn.wq").parts["qs"]
        assert not part.flags.writeable  # the kernels see the same read-only array type
        m = Model(st, ctx=32, threads=1)
        full = m.logits(tokens)
        m.reset()
        m.prefill(tokens[:3])
        steps = [m.decode(t).copy() for t in tokens[3:]]
        out[mode] = (full, np.stack(steps))
    np.testing.assert_array_equal(out["memory"][0], out["mmap"][0])
    np.testing.assert_array_equal(out["memory"][1], out["mmap"][1])


def test_memory_mode_holds_a_private_copy(baby):
    """After a "memory" open the file can change under us (a re-convert in place) without the
    running model seeing it; a map would."""
    st = open_model_dir(baby, load="memory")
    t = st.tensor("layers.0.attn.wq")
    before = t.parts["qs"].copy()
    data = baby / t.file
    raw = data.read_bytes()
    try:
        flipped = bytearray(raw)
        off = t.offset
        flipped[off : off + 64] = bytes(b ^ 0xFF for b in raw[off : off + 64])
        data.write_bytes(bytes(flipped))
        np.testing.assert_array_equal(t.parts["qs"], before)
    finally:
        data.write_bytes(raw)


def test_auto_rule(monkeypatch):
    """ "auto" reads a model that takes at most 60% of the available memory (or fits the
    --max-memory budget when one is given) and at most 4 GiB, maps any other; an explicit mode is
    kept."""
    monkeypatch.setattr(store_mod, "available_memory", lambda: 10_000)
    assert resolve_load_mode("auto", 6_000) == "memory"
    assert resolve_load_mode("auto", 6_001) == "mmap"
    assert resolve_load_mode("auto", 6_001, budget=7_000) == "memory"
    assert resolve_load_mode("auto", 5_000, budget=4_000) == "mmap"
    assert resolve_load_mode("mmap", 1) == "mmap"
    assert resolve_load_mode("memory", 10**15) == "memory"
    monkeypatch.setattr(store_mod, "available_memory", lambda: 100 << 30)
    assert resolve_load_mode("auto", 4 << 30) == "memory"
    assert resolve_load_mode("auto", (4 << 30) + 1) == "mmap"  # a 12 s read is not worth it by default
    assert resolve_load_mode("auto", (4 << 30) + 1, budget=64 << 30) == "mmap"
    monkeypatch.setattr(store_mod, "available_memory", lambda: None)
    assert resolve_load_mode("auto", 1) == "mmap"  # unknown memory: do not gamble
    with pytest.raises(ValueError):
        resolve_load_mode("ram", 1)


def test_file_shrinking_during_the_read_is_a_clear_error(baby, monkeypatch, tmp_path):
    """The size check passed, then the file came up short while being read: a model-format error
    naming the file, not a model with a zero-filled tail."""
    data = next(baby.glob("weights-*.bin"))
    short = tmp_path / data.name
    short.write_bytes(data.read_bytes()[:-4096])
    with pytest.raises(ModelFormatError, match="ended after"):
        store_mod._read_file(short, data.stat().st_size)


def test_runtime_flags(baby):
    """--mmap / --no-mmap reach the store; --no-mmap with a budget smaller than the model is a
    usage error that names both sizes' owners."""
    m, _ = load_runtime_model(str(baby), ctx=16, threads=1, mmap=True)
    assert m.store.load == "mmap"
    m, _ = load_runtime_model(str(baby), ctx=16, threads=1, mmap=False)
    assert m.store.load == "memory"
    with pytest.raises(UsageError, match="--no-mmap"):
        load_runtime_model(str(baby), ctx=16, threads=1, mmap=False, max_memory="1KB")
    from mixcli.expert_cache import ExpertCache, memory_for_slots
    from mixcli.kv_cache import kv_cache_bytes

    store = open_model_dir(baby)  # room for the KV cache and 2 of the experts: the expert cache
    budget = str(memory_for_slots(store, 2) + kv_cache_bytes(store.config, 16))
    m, _ = load_runtime_model(str(baby), ctx=16, threads=1, max_memory=budget)
    assert m.store.load == "mmap" and isinstance(m.experts, ExpertCache)


def test_bench_cli_reports_the_load_mode(tmp_path_factory, capsys):
    from mixcli.cli import main

    model = babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")
    for flag, word in (("--mmap", "mapped"), ("--no-mmap", "in memory")):
        code = main(["bench", str(model), "--pp", "8", "--tg", "4", "--reps", "1", "-t", "1", flag])
        out = capsys.readouterr().out
        assert code == 0 and f"weights {word}" in out.replace("\n", " "), out
    code = main(["bench", str(model), "--pp", "8", "--tg", "4", "--reps", "1", "-t", "1", "--no-mmap", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["results"]


def test_bench_under_a_budget_reports_the_expert_cache(tmp_path_factory, capsys):
    """bench with --max-memory prints the cache's counters (ui.cache_report, as --stats does):
    its slots, policy and hits; without a budget there is no cache to report."""
    from mixcli.cli import main
    from mixcli.expert_cache import memory_for_slots

    model = babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")
    from mixcli.kv_cache import kv_cache_bytes

    store = open_model_dir(model)  # 2 experts' slots, and the KV cache of bench's context (max(pp, tg, 16) + 8)
    budget = str(memory_for_slots(store, 2) + kv_cache_bytes(store.config, 24))
    code = main(["bench", str(model), "--pp", "8", "--tg", "4", "--reps", "1", "-t", "1", "--max-memory", budget])
    out = capsys.readouterr().out
    assert code == 0 and "expert cache: 2 slots" in out and "policy next + prefetch" in out and "hits " in out, out
    code = main(["bench", str(model), "--pp", "8", "--tg", "4", "--reps", "1", "-t", "1"])
    assert code == 0 and "expert cache" not in capsys.readouterr().out


def test_unknown_storage_type_is_named(baby, tmp_path):
    """A model written by a newer mixcli (a storage type we do not know) is refused with the type's
    name and what to do, not a bare 'malformed entry'."""
    import shutil

    copy = tmp_path / "newer"
    shutil.copytree(baby, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["tensors"]["layers.0.attn.wq"]["type"] = "q3_z"
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelFormatError, match=r"storage type 'q3_z'.*does not know") as err:
        open_model_dir(copy)
    assert "upgrade mixcli" in err.value.hint


def test_no_memory_for_the_read_is_a_clear_error(baby, monkeypatch):
    """The anonymous mapping cannot be made (ENOMEM, a ulimit): one MixcliError that names the
    size and suggests --mmap, not an OSError traceback; and through the CLI, one error line."""
    import errno

    from mixcli.errors import MixcliError

    real = mmap_module.mmap

    def no_room(fileno, length, *a, **kw):
        if fileno == -1:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(fileno, length, *a, **kw)

    monkeypatch.setattr(store_mod.mmap, "mmap", no_room)
    with pytest.raises(MixcliError, match="cannot hold the model's .* in memory") as err:
        open_model_dir(baby, load="memory")
    assert "--mmap" in err.value.hint
    assert open_model_dir(baby, load="mmap").load == "mmap"  # the map still works


def test_read_error_is_a_clear_error(baby, monkeypatch):
    """An I/O error while reading the data file (a failing disk) is a model-format error naming it."""
    import errno

    class Failing:
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def readinto(self, b):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod, "open", Failing, raising=False)
    with pytest.raises(ModelFormatError, match="cannot read data file .*Input/output error"):
        open_model_dir(baby, load="memory")


def _mapping(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping of this process that holds ``address``."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps", encoding="ascii", errors="replace"):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            if inside:
                break
            lo, _, hi = head.partition("-")
            inside = int(lo, 16) <= address < int(hi, 16)
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if not fields:
        raise AssertionError(f"no mapping holds {address:#x}")
    return fields


def _vm_flags(address: int) -> list[str]:
    return _mapping(address)["VmFlags"].split()


def test_memory_mode_asks_for_huge_pages(baby):
    """Weights read into memory are advised for transparent huge pages (decode streams 8-16%
    faster from them, see mixcli/hugepages.py) wherever the kernel has THP; a file map is not."""
    st = open_model_dir(baby, load="memory")
    qs = st.tensor("layers.0.attn.wq").parts["qs"]
    flags = _vm_flags(qs.ctypes.data)
    assert ("hg" in flags) == os.path.isdir("/sys/kernel/mm/transparent_hugepage")
    assert "nh" not in flags
    mapped = open_model_dir(baby, load="mmap").tensor("layers.0.attn.wq").parts["qs"]
    assert "hg" not in _vm_flags(mapped.ctypes.data)  # the file map is the page cache's business


@pytest.mark.parametrize("err,fails", [("ENOMEM", True), ("EINVAL", False)])
def test_populate_refused(baby, monkeypatch, err, fails):
    """No memory to populate the pages: the same clear error as a refused mapping. A kernel
    without MADV_POPULATE_WRITE (EINVAL): the read faults the pages in, and the model loads."""
    import errno

    from mixcli import hugepages
    from mixcli.errors import MixcliError

    class Refusing(mmap_module.mmap):
        def madvise(self, option, *a):
            if option == hugepages.MADV_POPULATE_WRITE:
                raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)))
            return super().madvise(option, *a)

    monkeypatch.setattr(hugepages.mmap, "mmap", Refusing)
    if fails:
        with pytest.raises(MixcliError, match="cannot hold the model's .* in memory") as e:
            open_model_dir(baby, load="memory")
        assert "--mmap" in e.value.hint
    else:
        st = open_model_dir(baby, load="memory")
        ref = open_model_dir(baby, load="mmap")
        name = "layers.0.attn.wq"
        np.testing.assert_array_equal(st.tensor(name).parts["qs"], ref.tensor(name).parts["qs"])


def _resident_fraction(buf) -> float:
    """Share of the pages of ``buf`` (an mmap) resident in memory, by mincore(2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap_module.PAGESIZE
    n = (len(buf) + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) / n


def test_old_kernel_without_thp_still_populates_up_front(monkeypatch):
    """Neither huge pages nor MADV_POPULATE_WRITE (EINVAL for both, as on a kernel before 5.14
    built without THP): the memory is populated by MAP_POPULATE instead, resident when returned."""
    import errno

    from mixcli import hugepages

    class Old(mmap_module.mmap):
        def madvise(self, option, *a):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(hugepages.mmap, "mmap", Old)
    buf = hugepages.anonymous(8 << 20, populate=True)
    assert _resident_fraction(buf) == 1.0
    assert "hg" not in _vm_flags(np.frombuffer(buf, np.uint8).ctypes.data)
    assert _resident_fraction(hugepages.anonymous(8 << 20)) == 0.0  # not asked to populate

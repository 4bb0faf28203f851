"""A seeded mutation fuzzer over what mixcli reads from strangers: converted-model manifests,
damaged data files, and GGUF headers. Shared by tests/test_fuzz.py (a few hundred cases) and
benchmarks/fuzz.py (thousands).

Each case runs in a forked child process, so a segfault is seen as a signal and a runaway
allocation or loop as a timeout; the child has a memory limit. A case is *clean* when it ends in
success or in a user error (``mixcli.errors.USER_ERRORS``: a MixcliError or one of quant's) with a
one-line message, and leaves nothing behind in its directory. The parent loads and runs the intact model
first, so numba's kernels are compiled before the first fork.

    python tests/fuzzing.py --n 200 --seed 0        # one table, as benchmarks/fuzz.py prints
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import select
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# children are forked: numba's OpenMP layer aborts a forked child, its workqueue layer does not
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

KINDS = ("manifest", "data", "gguf")
CASE_TIMEOUT = 60.0  # seconds; a loaded 2-core machine runs a case in well under a second
CHILD_MEMORY = 3 << 30  # bytes of address space a case may add to the parent's


# ---------------------------------------------------------------------------------------------
# seeds: the intact inputs
# ---------------------------------------------------------------------------------------------
def make_seeds(root: Path) -> dict[str, Path]:
    from babymodels import make_hf_checkpoint
    from quant.convert import convert_checkpoint
    from test_gguf_import import make_gguf_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    model = root / "seed-model"
    if not (model / "manifest.json").is_file():
        convert_checkpoint(make_hf_checkpoint(root / "seed-src", "mixtral"), model, quant="q4_0")
    gguf_file = root / "seed.gguf"
    if not gguf_file.is_file():
        make_gguf_checkpoint(gguf_file, "mixtral")
    return {"model": model, "gguf": gguf_file}


def gguf_data_start(path: Path) -> int:
    import gguf

    r = gguf.GGUFReader(path)
    return min(int(t.data_offset) for t in r.tensors)


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------
INTERESTING = [
    0,
    -1,
    1,
    2,
    3,
    7,
    64,
    4095,
    4096,
    2**31 - 1,
    2**31,
    2**32,
    2**63 - 1,
    2**64,
    10**12,
    -(2**63),
    0.5,
    1e-30,
    1e308,
    float("nan"),
    float("inf"),
    -float("inf"),
    "",
    "x",
    "weights-00000.bin",
    "../manifest.json",
    "q4_0",
    "q8_0r16",
    "f32",
    None,
    True,
    False,
    [],
    {},
    [0],
    [1, 1],
    [64, 64],
    [4096, 64],
    {"x": 1},
    "a" * 10000,
]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _numeric_twist(rng: random.Random, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return rng.choice(INTERESTING)
    return rng.choice([v + 1, v - 1, v * 2, v // 2 if isinstance(v, int) else v / 2, -v, v * 1000, 0, v + 4096, v + 64])


def mutate_manifest(rng: random.Random, m: dict) -> tuple[dict | None, bytes | None, str]:
    """A mutated manifest (or raw bytes for text-level damage) and a short description."""
    m = copy.deepcopy(m)
    how = rng.random()
    if how < 0.1:  # text-level: flip, cut
        text = bytearray(json.dumps(m).encode())
        if rng.random() < 0.5:
            i = rng.randrange(len(text))
            text[i] = rng.randrange(256)
            return None, bytes(text), f"byte {i} of the JSON"
        cut = rng.randrange(len(text))
        return None, bytes(text[:cut]), f"JSON cut at {cut}"
    # most of the damage in the config and in the small tables, where a bad value does the most harm
    pool = list(_paths(m))
    if how < 0.45:
        pool = [p for p in pool if p[0][:1] == ("config",) and len(p[0]) > 1] or pool
    elif how < 0.6:
        pool = [p for p in pool if p[0][:1] in (("experts",), ("files",))] or pool
    path, value = rng.choice(pool[1:])
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    r = rng.random()
    if r < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return m, None, f"deleted {'.'.join(map(str, path))}"
    new = _numeric_twist(rng, value) if r < 0.6 else rng.choice(INTERESTING)
    parent[path[-1]] = new
    return m, None, f"{'.'.join(map(str, path))} = {str(new)[:40]!r}"


def mutate_data(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    r = rng.random()
    if r < 0.5:
        i = rng.randrange(len(b))
        n = rng.choice([1, 16, 4096])
        for j in range(i, min(len(b), i + n)):
            b[j] ^= rng.randrange(1, 256)
        return bytes(b), f"{n} bytes flipped at {i}"
    if r < 0.8:
        cut = rng.randrange(len(b))
        return bytes(b[:cut]), f"cut at {cut}"
    return bytes(b) + bytes(rng.randrange(1, 8192)), "grown"


def mutate_gguf(rng: random.Random, data: bytes, header_end: int) -> tuple[bytes, str]:
    b = bytearray(data)
    r = rng.random()
    if r < 0.35:  # an integer field overwritten with a hostile value
        i = rng.randrange(4, header_end - 8)
        width = rng.choice([4, 8])
        v = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1, rng.randrange(2**16)])
        b[i : i + width] = (v % 2 ** (8 * width)).to_bytes(width, "little")
        return bytes(b), f"{width}-byte field at {i} = {v}"
    if r < 0.75:  # a few random bytes in the header
        for _ in range(rng.choice([1, 1, 2, 4])):
            i = rng.randrange(header_end)
            b[i] = rng.randrange(256)
        return bytes(b), "header bytes flipped"
    if r < 0.9:  # a small integer nudged (counts, lengths, dims, types)
        i = rng.randrange(4, header_end - 4)
        v = int.from_bytes(b[i : i + 4], "little")
        b[i : i + 4] = ((v + rng.choice([-2, -1, 1, 2, 32, 4096])) % 2**32).to_bytes(4, "little")
        return bytes(b), f"u32 at {i} nudged"
    cut = rng.randrange(len(b))
    return bytes(b[:cut]), f"cut at {cut}"


# ---------------------------------------------------------------------------------------------
# running one case in a child
# ---------------------------------------------------------------------------------------------
def _one_line_error(exc: BaseException) -> bool:
    from mixcli.errors import USER_ERRORS

    return isinstance(exc, USER_ERRORS) and "\n" not in str(exc) and bool(str(exc))


def _run_model(model: Path) -> str:
    import numpy as np

    import mixcli

    m = mixcli.load(model, ctx=32, threads=1, load="mmap")
    logits = m.logits([1, 2, 3, 4])
    if not np.isfinite(logits).all():
        return "ok (non-finite logits)"
    info = m.store.tokenizer_info
    if info:
        from mixcli.tokenizer import load_tokenizer

        load_tokenizer(model, info).encode("hello world", add_bos=True, parse_special=False)
    return "ok"


def case_body(kind: str, case_dir: Path) -> str:
    if kind in ("manifest", "data"):
        return _run_model(case_dir / "model")
    from quant.gguf_convert import convert_gguf

    out = case_dir / "out" / "model"
    convert_gguf(case_dir / "in.gguf", out)
    return "converted, " + _run_model(out)


def run_in_child(kind: str, case_dir: Path, timeout: float = CASE_TIMEOUT) -> tuple[str, str]:
    """Fork; the child runs the case and reports one line. Returns (class, detail): class is
    "ok", "clean" (one-line mixcli error), "exception", "signal", "hang" or "memory"."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(rfd)
            soft = _vm_size() + CHILD_MEMORY
            resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
            try:
                result = "ok\t" + case_body(kind, case_dir)
            except MemoryError:
                result = "memory\tMemoryError"
            except BaseException as exc:  # classified, this is the point
                cls = "clean" if _one_line_error(exc) else "exception"
                result = f"{cls}\t{type(exc).__name__}: {str(exc)[:300]}"
            os.write(wfd, result.replace("\n", "\\n").encode("utf-8", "replace") + b"\n")
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(wfd)
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([rfd], [], [], max(0.0, left))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rfd)
            return "hang", f"no result in {timeout:.0f} s"
        data = os.read(rfd, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal", signal.Signals(os.WTERMSIG(status)).name
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if not text:
        return "exception", f"child exited {os.WEXITSTATUS(status)} without a result"
    cls, _, detail = text.partition("\t")
    return cls, detail


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# the campaign
# ---------------------------------------------------------------------------------------------
def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def prepare_case(
    kind: str, rng: random.Random, seeds: dict[str, Path], work: Path, cache: dict
) -> tuple[Path, str, set[str]]:
    """A fresh case directory; returns (dir, description, names allowed to exist afterwards)."""
    case = work / "case"
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    if kind in ("manifest", "data"):
        model = case / "model"
        model.mkdir()
        seed = seeds["model"]
        for f in seed.iterdir():
            if f.name != ".verified.json":
                os.link(f, model / f.name)  # hard links: the data files are shared, never written here
        m = cache.setdefault("manifest", json.loads((seed / "manifest.json").read_text()))
        if kind == "manifest":
            new, raw, what = mutate_manifest(rng, m)
            (model / "manifest.json").unlink()
            (model / "manifest.json").write_bytes(raw if raw is not None else json.dumps(new).encode())
        else:
            name = rng.choice([f["name"] for f in m["files"]])
            data, what = mutate_data(rng, (seed / name).read_bytes())
            (model / name).unlink()
            (model / name).write_bytes(data)
            what = f"{name}: {what}"
        allowed = _tree(case) | {"model/.verified.json"}
    else:
        src = seeds["gguf"]
        raw = cache.setdefault("gguf", src.read_bytes())
        header_end = cache.setdefault("gguf_header", gguf_data_start(src))
        data, what = mutate_gguf(rng, raw, header_end)
        (case / "in.gguf").write_bytes(data)
        (case / "out").mkdir()
        allowed = (
            _tree(case)
            | {"out/model"}
            | {f"out/model/{p}" for p in cache.setdefault("gguf_tree", _converted_tree(src, work))}
        )
    return case, what, allowed


def _converted_tree(src: Path, work: Path) -> set[str]:
    from quant.gguf_convert import convert_gguf

    out = work / "intact-gguf-model"
    if not out.exists():
        convert_gguf(src, out)
    return _tree(out)


def warm_up(seeds: dict[str, Path]) -> None:
    """Compile/load every kernel in the parent so forked children only run them."""
    _run_model(seeds["model"])
    from quant.writer import warm_quantizers

    warm_quantizers(
        {(d, q) for d in ("f16", "f32", "bf16") for q in ("q4_0", "q4_0r16", "q8_0", "q8_0r16", "f16", "f32")}
    )


def campaign(kinds: dict[str, int], seed: int, work: Path, progress=None) -> dict[str, dict]:
    """Run ``kinds[kind]`` cases of each kind; per kind: counts by class and the unclean cases."""
    work.mkdir(parents=True, exist_ok=True)
    seeds = make_seeds(work / "seeds")
    warm_up(seeds)
    rng = random.Random(seed)
    cache: dict = {}
    report = {}
    for kind, n in kinds.items():
        counts: Counter = Counter()
        bad = []
        t0 = time.perf_counter()
        for i in range(n):
            case, what, allowed = prepare_case(kind, rng, seeds, work, cache)
            cls, detail = run_in_child(kind, case)
            left = _tree(case) - allowed
            if cls in ("ok", "clean") and left:
                cls, detail = "leftover", f"left {sorted(left)[:3]}"
            counts[cls] += 1
            if cls not in ("ok", "clean"):
                bad.append({"case": i, "mutation": what, "class": cls, "detail": detail})
            if progress is not None:
                progress(kind, i + 1, n)
        report[kind] = {"counts": dict(counts), "bad": bad, "seconds": time.perf_counter() - t0}
    shutil.rmtree(work / "case", ignore_errors=True)
    return report


def table(report: dict[str, dict]) -> str:
    lines = [
        "| class | tried | ok | refused cleanly | other exceptions | signals | hangs | memory | leftovers | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "manifest": "mutated manifests, load + logits",
        "data": "damaged data files, load + logits",
        "gguf": "mutated GGUF headers, convert + load + logits",
    }
    for kind, r in report.items():
        c = r["counts"]
        lines.append(
            f"| {names[kind]} | {sum(c.values())} | {c.get('ok', 0)} | {c.get('clean', 0)} | "
            f"{c.get('exception', 0)} | {c.get('signal', 0)} | {c.get('hang', 0)} | {c.get('memory', 0)} | "
            f"{c.get('leftover', 0)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="mixcli's mutation fuzzer (see tests/fuzzing.py)")
    ap.add_argument("--n", type=int, default=200, help="cases per kind")
    ap.add_argument("--manifest", type=int, help="cases of mutated manifests (default --n)")
    ap.add_argument("--data", type=int, help="cases of damaged data files (default --n / 4)")
    ap.add_argument("--gguf", type=int, help="cases of mutated GGUF headers (default --n)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="mixcli-fuzz-"))
    kinds = {
        "manifest": a.manifest if a.manifest is not None else a.n,
        "data": a.data if a.data is not None else max(1, a.n // 4),
        "gguf": a.gguf if a.gguf is not None else a.n,
    }
    report = campaign(kinds, a.seed, work)
    if a.json:
        print(json.dumps(report))
    else:
        print(table(report))
        for kind, r in report.items():
            for b in r["bad"][:20]:
                print(f"{kind} #{b['case']} [{b['class']}] {b['mutation']}: {b['detail']}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(not r["bad"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

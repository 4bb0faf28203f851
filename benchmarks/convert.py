"""Benchmark `mixcli convert` on a random-weight checkpoint of real Mixtral width.

    python benchmarks/convert.py [--layers 1] [--quant q4_0] [--dir /tmp] [--repeat 1]
    python benchmarks/convert.py --gguf [--layers 1] [--code DIR]

Builds the checkpoint in a temporary directory (removed at the end): hidden 4096, expert FFN
14336, 8 experts, 32/8 heads, vocab 32000, ``--layers`` layers, one bf16 safetensors shard per
layer; with ``--gguf`` a Q4_0 GGUF as llama.cpp lays one out (``synth.write_random_gguf``:
stacked experts, random blocks) converted with ``--quant keep``.
Then, with the source's pages dropped from the page cache each time (fsync + posix_fadvise
DONTNEED), it times reading the source twice with ``cat`` and runs the conversion in a fresh
subprocess, whose own VmHWM is its peak resident memory. Goals from the issues: peak RSS under
2x the largest tensor (for a GGUF the largest tensor in the file, a stacked [E, N, K] expert
tensor), conversion faster than reading the source twice. ``--code DIR`` converts with the mixcli
in DIR instead (e.g. ``git archive OLDCOMMIT | tar -x -C DIR``), to compare with an older version.
``--repeat N`` alternates the two timings N times on the same checkpoint and reports every run, with the 1-minute load
average before each (generating the checkpoint raises it to ~1; well above, something else ran).
Single runs vary by a second or more on the 2-core VM: besides other processes, a cold read of the
3.2 GB source costs either ~0.45 s or ~2.3 s of kernel CPU copying out of the page cache (measured
with cat and pread alike, alternating from one read to the next), and that copy is the
conversion's critical path when it is slow.

A tiny conversion runs first so numba's on-disk kernel cache is warm (a one-time cost per install).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from synth import drop_page_cache  # noqa: E402

# The timed region is what `mixcli convert` costs once Python is up: importing the converter
# (numpy; numba where the converter imports it), numba's start-up (loading the cached kernels), and
# the conversion. The converter overlaps the numba part with reading the source (HFCheckpoint.warm);
# "of which before the conversion starts" is the import time alone.
CHILD = r"""
import json, resource, sys, time
def peak_kib():
    # VmHWM: this process's own high-water mark. ru_maxrss is not: Linux carries it over from the
    # parent through fork and exec, so a parent that held a big tensor would count here.
    try:
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
sys.path.insert(0, {repo!r})
from {module} import {function} as convert
imp = time.perf_counter() - t
rss0 = peak_kib()
s = convert({src!r}, {out!r}, quant={quant!r})
dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "import_seconds": imp, "params": s.params, "bytes": s.bytes_on_disk,
                  "bpw": s.bits_per_weight, "max_abs_err": s.max_abs_err, "rss_imports_kib": rss0,
                  "rss_kib": peak_kib()}}))
"""


def mixtral_config(layers: int, vocab: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": vocab,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_bf16_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """Stream random bf16 tensors into a safetensors file without holding one in memory."""
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            total = int(np.prod(shape))
            scale = 1.0 if len(shape) == 1 else 0.02
            for a in range(0, total, 1 << 24):
                x = rng.standard_normal(min(1 << 24, total - a), dtype=np.float32) * np.float32(scale)
                if len(shape) == 1:
                    x += np.float32(1.0)
                fh.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # truncate to bf16
        fh.flush()
        os.fsync(fh.fileno())


def make_checkpoint(src: Path, layers: int, vocab: int) -> None:
    from babymodels import hf_tensor_shapes

    cfg = mixtral_config(layers, vocab)
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = hf_tensor_shapes(cfg)
    groups: list[dict] = [{} for _ in range(layers)]
    for name, shape in shapes.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else (0 if "embed" in name else layers - 1)
        groups[layer][name] = shape
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        write_bf16_shard(src / fname, g, rng)
        weight_map.update(dict.fromkeys(g, fname))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def time_read_twice(files: list[Path]) -> float:
    total = 0.0
    for _ in range(2):
        drop_page_cache(files)
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        total += time.perf_counter() - t
    return total


def run_child(src: Path, out: Path, quant: str, code_dir: Path = REPO) -> dict:
    module, function = (
        ("quant.gguf_convert", "convert_gguf") if src.suffix == ".gguf" else ("quant.convert", "convert_checkpoint")
    )
    code = CHILD.format(repo=str(code_dir), src=str(src), out=str(out), quant=quant, module=module, function=function)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"conversion failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--dir", default=None, help="where to build the temporary checkpoint (default: system temp)")
    ap.add_argument("--repeat", type=int, default=1, help="time reading and converting this many times each")
    ap.add_argument("--gguf", action="store_true", help="convert a Q4_0 GGUF (with --quant keep) instead")
    ap.add_argument("--code", type=Path, default=REPO, help="the mixcli tree whose converter runs (default: this one)")
    args = ap.parse_args()
    if args.gguf and args.quant == "q4_0":
        args.quant = "keep"

    from babymodels import make_hf_checkpoint

    base = Path(tempfile.mkdtemp(prefix="mixcli-bench-", dir=args.dir))
    try:
        if args.gguf:
            from synth import write_random_gguf

            warm = write_random_gguf(base / "warm.gguf", layers=1, vocab=512)
            # (a 1-layer, small-vocab GGUF of full width: numba's kernels get compiled or loaded)
        else:
            warm = make_hf_checkpoint(base / "warm", "mixtral", dtype="bf16")
        run_child(warm, base / "warm-out", args.quant, args.code)  # fills numba's kernel cache

        t = time.perf_counter()
        if args.gguf:
            src = write_random_gguf(base / "src.gguf", layers=args.layers, vocab=args.vocab)
            files = [src]
        else:
            src = base / "src"
            make_checkpoint(src, args.layers, args.vocab)
            files = sorted(src.glob("*.safetensors"))
        gen = time.perf_counter() - t
        src_bytes = sum(f.stat().st_size for f in files)
        if args.gguf:
            import gguf

            big = max(gguf.GGUFReader(src).tensors, key=lambda t: int(t.n_bytes))
            largest = type(
                "T", (), {"hf_name": big.name, "shape": [int(x) for x in big.shape[::-1]], "nbytes": int(big.n_bytes)}
            )
        else:
            from quant.sources.hf import open_hf_checkpoint

            with open_hf_checkpoint(src) as ck:
                largest = max(ck.tensors.values(), key=lambda t: t.nbytes)
        runs = []  # (load average, read twice s, conversion result)
        for _ in range(max(1, args.repeat)):
            shutil.rmtree(base / "out", ignore_errors=True)
            load = os.getloadavg()[0]
            read2 = time_read_twice(files)
            drop_page_cache(files)
            runs.append((load, read2, run_child(src, base / "out", args.quant, args.code)))
        res = min((r[2] for r in runs), key=lambda r: r["seconds"])
        rss = max(r[2]["rss_kib"] for r in runs) * 1024
        met = sum(r[2]["seconds"] < r[1] for r in runs)
        rows = [
            ("layers / quant", f"{args.layers} / {args.quant}"),
            ("parameters", f"{res['params'] / 1e9:.3f} B"),
            ("source size", f"{src_bytes / 2**30:.2f} GiB ({'Q4_0 GGUF' if args.gguf else 'bf16'})"),
            ("converter", str(args.code)),
            ("output size", f"{res['bytes'] / 2**30:.2f} GiB ({res['bpw']:.2f} bits/weight)"),
            ("conversion time", " / ".join(f"{r[2]['seconds']:.2f}" for r in runs) + " s"),
            (
                "  of which imports before the conversion starts",
                " / ".join(f"{r[2]['import_seconds']:.2f}" for r in runs) + " s",
            ),
            ("params/s (fastest run)", f"{res['params'] / res['seconds'] / 1e6:.0f} M/s"),
            ("read source twice (cold, cat)", " / ".join(f"{r[1]:.2f}" for r in runs) + " s"),
            ("load average before each", " / ".join(f"{r[0]:.2f}" for r in runs)),
            ("peak RSS of conversion", f"{rss / 2**20:.0f} MiB"),
            ("  of which imports", f"{res['rss_imports_kib'] / 1024:.0f} MiB"),
            ("largest tensor", f"{largest.hf_name} {list(largest.shape)} {largest.nbytes / 2**20:.0f} MiB"),
            ("peak RSS / largest tensor", f"{rss / largest.nbytes:.2f}"),
            ("largest quant error", f"{res['max_abs_err']:.4g}"),
            ("goal: RSS < 2x largest", "met" if rss < 2 * largest.nbytes else "MISSED"),
            (
                "goal: faster than reading twice",
                ("met" if met == len(runs) else "MISSED")
                + (f" (in {met} of {len(runs)} runs)" if len(runs) > 1 else ""),
            ),
            ("(generating the checkpoint took)", f"{gen:.1f} s"),
        ]
        width = max(len(a) for a, _ in rows)
        print(f"{'metric':<{width}}  value")
        print(f"{'-' * width}  {'-' * 40}")
        for a, b in rows:
            print(f"{a:<{width}}  {b}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

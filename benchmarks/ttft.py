"""Time to first token of `mixcli generate` on the default model, as a user meets it: a fresh
process per run, warm caches (the OS page cache and numba's on-disk JIT cache, filled by one
untimed warm-up run), and a breakdown of where the time goes.

    python benchmarks/ttft.py                  # 10 reps
    python benchmarks/ttft.py --reps 3 --prompt "Name three rivers." --threads 2

End to end: the installed `mixcli` console script (the one beside this Python, so no pyenv shim
or other wrapper is timed) runs `generate --prompt P --max-tokens 1 --temp 0`; the time from
spawning it to the first byte on its stdout is the time to first token, and the time to its exit
is shown too. Goal (issue 6): under 1.5 s.

Breakdown (separate instrumented runs, same command, same process model): a driver records
wall-clock timestamps around the CLI's own entry point `mixcli.cli.main`: interpreter start-up
(spawn to the driver's first line), imports (every module a real run ends up importing, found by a
discovery run and imported up front so the later phases contain no import time), model load
(`mixcli.runtime.load_runtime`: manifest, memory maps, kernel binding, tokenizer), prompt
(chat template + tokenization), JIT cache load and thread-pool start (the first prefill minus
the same prefill repeated in the warm process), prefill itself, and sampling + detokenizing +
writing the token. `python -X importtime` on one more run names the heaviest packages.

First run (``--cold N``, default 2): the same command with numba's cache pointed at a new, empty
directory (NUMBA_CACHE_DIR), as after `pip install .`: every kernel the model needs is compiled.
Goal (issue 15): first token under 15 s, with the one-line compile notice on stderr and nothing
but the answer on stdout.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_S = 1.5
COLD_GOAL_S = 15.0

DRIVER = r"""
import time
T = {"interp": time.time()}
import json, sys
out_path, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "timed":
    import importlib
    for name in json.load(open(out_path + ".modules")):
        try:
            importlib.import_module(name)
        except Exception:
            pass
T["imports"] = time.time()
import mixcli.cli, mixcli.runtime, mixcli.model

seen = {}
_load = mixcli.runtime.load_runtime
def load_runtime(*a, **k):
    T["load0"] = time.time()
    rt = _load(*a, **k)
    T["load1"] = time.time()
    return rt
mixcli.runtime.load_runtime = load_runtime
_prefill = mixcli.model.Model.prefill
def prefill(self, tokens, *a, **k):
    first = "model" not in seen
    if first:
        T["prefill0"] = time.time()
    r = _prefill(self, tokens, *a, **k)
    if first:
        T["prefill1"] = time.time()
        seen.update(model=self, tokens=list(tokens))
    return r
mixcli.model.Model.prefill = prefill

class Out:
    def __init__(self, f):
        self._f = f
    def write(self, s):
        if s and "first_write" not in T:
            T["first_write"] = time.time()
        return self._f.write(s)
    def __getattr__(self, name):
        return getattr(self._f, name)
sys.stdout = Out(sys.stdout)
T["main0"] = time.time()
code = mixcli.cli.main(argv)
T["main1"] = time.time()
sys.stdout.flush()
if mode == "discover":
    json.dump(sorted(n for n, m in sys.modules.items() if m is not None and "__main__" not in n.split(".")),
              open(out_path + ".modules", "w"))
steady = []
m = seen.get("model")
if m is not None:
    for _ in range(3):
        m.reset()
        t = time.perf_counter()
        _prefill(m, seen["tokens"])
        steady.append(time.perf_counter() - t)
    T["prompt_tokens"] = len(seen["tokens"])
T["steady_prefill"] = min(steady) if steady else None
T["code"] = code
json.dump(T, open(out_path, "w"))
"""


def child_env() -> dict[str, str]:
    """The environment of a user's shell: without PYTHONDONTWRITEBYTECODE (set in some sandboxes
    and CI images), so the warm-up run leaves .pyc files and later runs import from them, as an
    installed mixcli does."""
    env = dict(os.environ)
    if not KEEP_ENV:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


KEEP_ENV = False


def mixcli_command() -> list[str]:
    """The console script installed beside this interpreter (what `pip install` puts on PATH)."""
    exe = Path(sys.executable).parent / "mixcli"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which("mixcli")
    return [found] if found else [sys.executable, "-m", "mixcli"]


def timed_run(cmd: list[str], env: dict | None = None, with_err: bool = False):
    """(seconds to the first stdout byte, seconds to exit, stdout[, stderr]). First byte = exit if none."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env or child_env(), bufsize=0
    )
    assert p.stdout is not None
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest, err = p.communicate()
    t_exit = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}): {err.decode(errors='replace')[-2000:]}")
    out = (t_first if first else t_exit), t_exit, (first + rest).decode(errors="replace")
    return out + (err.decode(errors="replace"),) if with_err else out


def cold_runs(cmd: list[str], n: int) -> list[tuple[float, str, str]]:
    """n first runs, each with an empty numba cache: (seconds to first token, stdout, stderr)."""
    res = []
    for i in range(n):
        with tempfile.TemporaryDirectory(prefix="mixcli-cold-jit-") as cache:
            f, _, out, err = timed_run(cmd, env={**child_env(), "NUMBA_CACHE_DIR": cache}, with_err=True)
        res.append((f, out, err))
        print(f"  cold run {i + 1}/{n}: first token {f:.2f} s", file=sys.stderr)
    return res


def driver_run(args_cli: list[str], tmp: Path, mode: str) -> dict:
    out = tmp / "timings.json"
    t_spawn = time.time()
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, str(out), mode, *args_cli], capture_output=True, cwd=ROOT, env=child_env()
    )
    if r.returncode:
        raise SystemExit(f"instrumented run failed: {r.stderr.decode(errors='replace')[-2000:]}")
    T = json.loads(out.read_text())
    if T.get("code"):
        raise SystemExit(f"instrumented run: mixcli exited {T['code']}: {r.stderr.decode(errors='replace')[-2000:]}")
    T["spawn"] = t_spawn
    return T


def phases(T: dict) -> dict[str, float]:
    first = T["prefill1"] - T["prefill0"]
    steady = T["steady_prefill"] if T["steady_prefill"] is not None else first
    return {
        "python start-up (interpreter, site)": T["interp"] - T["spawn"],
        "imports (all modules a run uses)": T["imports"] - T["interp"],
        "CLI: parse arguments, resolve model": T["load0"] - T["imports"],
        "model load (manifest, read or map weights, kernels, tokenizer)": T["load1"] - T["load0"],
        "prompt: chat template + tokenize": T["prefill0"] - T["load1"],
        "JIT cache load + thread pool (1st prefill - steady)": max(first - steady, 0.0),
        f"prefill, {T.get('prompt_tokens', '?')} tokens (steady)": min(steady, first),
        "sample + detokenize + write": T["first_write"] - T["prefill1"],
    }


def import_profile(cmd_args: list[str]) -> tuple[float, list[tuple[str, float]], list[tuple[str, float]]]:
    """From `python -X importtime` (which adds its own overhead): the total, self time per package,
    and the cumulative time of each top-level import (which of our modules pulled the heavy ones in)."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mixcli", *cmd_args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
    )
    per: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        try:
            self_us, cum_us, raw = line[len("import time:") :].split("|")
            name = raw.strip()
            per[name.split(".")[0]] = per.get(name.split(".")[0], 0.0) + int(self_us) / 1e6
            if raw.startswith(" ") and not raw.startswith("  "):  # depth 0: one space after the bar
                top.append((name, int(cum_us) / 1e6))
        except ValueError:
            continue
    return (sum(per.values()), sorted(per.items(), key=lambda kv: -kv[1]), sorted(top, key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10, help="timed end-to-end runs (and up to 5 instrumented ones)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--model", default=None, help="model name or directory (default: the registry's default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cold", type=int, default=2, help="first runs with an empty numba cache (0: none)")
    ap.add_argument(
        "--keep-env",
        action="store_true",
        help="pass PYTHONDONTWRITEBYTECODE through to the runs (default: drop it, as a user's shell has it unset)",
    )
    args = ap.parse_args()
    global KEEP_ENV
    KEEP_ENV = args.keep_env
    if args.reps < 1:
        ap.error("--reps must be >= 1")

    cli_args = [
        "generate",
        *([args.model] if args.model else []),
        "--prompt",
        args.prompt,
        "--max-tokens",
        "1",
        "--temp",
        "0",
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    cmd = mixcli_command() + cli_args
    print(f"$ {' '.join(cmd)}", file=sys.stderr)
    print(
        "warm-up run (fills the page cache and numba's JIT cache; pulls the default model if it is "
        "not in the store yet)...",
        file=sys.stderr,
    )
    _, warm_exit, text = timed_run(cmd)
    print(f"warm-up: {warm_exit:.2f} s, output {text!r}", file=sys.stderr)

    cold = cold_runs(cmd, args.cold) if args.cold else []
    firsts, exits = [], []
    for i in range(args.reps):
        f, e, _ = timed_run(cmd)
        firsts.append(f)
        exits.append(e)
        print(f"  run {i + 1}/{args.reps}: first token {f:.3f} s, exit {e:.3f} s", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="mixcli-ttft-"))
    try:
        driver_run(cli_args, tmp, "discover")
        runs = [phases(driver_run(cli_args, tmp, "timed")) for _ in range(min(args.reps, 5))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    imp_total, imp_pkg, imp_top = import_profile(cli_args)

    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(100, shutil.get_terminal_size().columns))
    print(f"\n$ python benchmarks/ttft.py {' '.join(sys.argv[1:])}")
    t = Table(title=f"time to first token: {' '.join(['mixcli', *cli_args])}  ({args.reps} runs, warm caches)")
    for c in ("", "mean s", "min s", "median s", "max s"):
        t.add_column(c, justify="right" if c else "left")
    for name, xs in (("first token on stdout", firsts), ("process exit", exits)):
        t.add_row(name, *(f"{v:.3f}" for v in (statistics.fmean(xs), min(xs), statistics.median(xs), max(xs))))
    con.print(t)
    mean = statistics.fmean(firsts)
    print(f"goal: first token < {GOAL_S} s: {'met' if mean < GOAL_S else 'NOT met'} (mean {mean:.3f} s)")
    if cold:
        from mixcli.kernels import COMPILE_NOTICE

        cf = [c[0] for c in cold]
        notice = all(COMPILE_NOTICE in c[2] for c in cold)
        same = all(c[1] == text for c in cold)  # stdout: the answer alone, as on a warm run
        print(
            f"first run (empty numba cache): first token {', '.join(f'{v:.2f}' for v in cf)} s; goal < {COLD_GOAL_S} s: "
            f"{'met' if max(cf) < COLD_GOAL_S else 'NOT met'}; compile notice on stderr: {'yes' if notice else 'NO'}; "
            f"stdout equal to a warm run's: {'yes' if same else 'NO'}"
        )
    if max(firsts) > 1.5 * min(firsts):
        print(
            "warning: runs vary by more than 1.5x: a busy machine, or numba's cache rebuilt because a "
            "kernel source changed during the run; rerun on a quiet machine"
        )

    b = Table(title=f"breakdown: median of {len(runs)} instrumented runs")
    b.add_column("phase")
    b.add_column("s", justify="right")
    b.add_column("share", justify="right")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = sum(med.values())
    for k, v in med.items():
        b.add_row(k, f"{v:.3f}", f"{100 * v / total:.0f}%")
    b.add_row("sum (instrumented time to first token)", f"{total:.3f}", "")
    con.print(b)

    it = Table(title=f"imports (python -X importtime, {imp_total:.3f} s in all, incl. its own overhead)")
    for c in ("top-level import", "cumulative s", "package", "self s"):
        it.add_column(c, justify="right" if c.endswith(" s") else "left")
    for i in range(10):
        a = imp_top[i] if i < len(imp_top) else ("", None)
        b = imp_pkg[i] if i < len(imp_pkg) else ("", None)
        it.add_row(a[0], "" if a[1] is None else f"{a[1]:.3f}", b[0], "" if b[1] is None else f"{b[1]:.3f}")
    con.print(it)


if __name__ == "__main__":
    main()

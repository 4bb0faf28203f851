"""`mixcli serve` against llama.cpp's `llama-server`, same weights, same --parallel, side by side.

    python benchmarks/serve.py                        # default model and Mixtral-width, 1/4/16 clients
    python benchmarks/serve.py --clients 1,4 --skip-mixtral --tokens 32

For each model and each client count N, both servers start fresh with ``--parallel N`` and 2
threads (llama-server: continuous batching, its default; a context of --ctx tokens per slot), get
one warm-up request, then N client threads each send --requests streamed /v1/completions requests
of --prompt random token ids (the same ids for both engines; prompts differ per request, so no
prompt cache helps either) with temperature 0, max_tokens --tokens and ``ignore_eos`` (llama-server's
field, which mixcli serve accepts too), so both generate exactly as many tokens. Printed per row:

- aggregate decode tok/s: every generated token / the wall time from the first request sent to the
  last one finished (prefill included, as a user sees it);
- p50 / p95 time to first token over all requests (queueing included);
- streaming tok/s: each request's tokens after its first over the time from its first token to its
  last (the rate a client sees while text streams), averaged over requests and multiplied by the
  client count: the decode throughput of N streams with the prompts' cost taken out, as far as
  the other streams' prompts do not interleave with them. With prompts as long as the outputs
  (the defaults), prefill is a large share of the wall time and it does not batch better than
  decode does, so both figures are printed.

Models: the default model (SmolLM2-135M-Instruct, the registry's Q4_1 GGUF: llama-server reads it,
mixcli imports it keeping its blocks) and a random-weight 2-layer model of Mixtral width written as
a Q4_0 GGUF (benchmarks/synth.py) and imported the same way. llama-server is built from the
llama-cpp-python sdist's sources for this host (benchmarks/llamacpp_build.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on 127.0.0.1; ``wait`` polls /health until it answers 200."""

    def __init__(self, cmd: list, port: int, logfile: Path):
        self.port = port
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}; see {logfile}")
            try:
                if self.get("/health") == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[0]} did not start; see {logfile}")
            time.sleep(0.3)

    def get(self, path: str) -> int:
        import http.client

        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            c.request("GET", path)
            return c.getresponse().status
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def one_request(port: int, prompt: list[int], max_tokens: int) -> dict:
    """A streamed /v1/completions request: {ttft, end, tokens} (seconds from its start)."""
    import http.client

    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
    )
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, chunks, usage = None, 0, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            if ch.get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    end = time.perf_counter() - t0
    c.close()
    n = usage["completion_tokens"] if usage else chunks
    return {"ttft": ttft if ttft is not None else end, "end": end, "tokens": n, "start": t0}


def run_clients(port: int, clients: int, prompts: list[list[int]], max_tokens: int) -> dict:
    per = len(prompts) // clients
    results, errors = [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        for p in prompts[i * per : (i + 1) * per]:
            try:
                r = one_request(port, p, max_tokens)
            except Exception as exc:  # reported, not hidden
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    rates = [(r["tokens"] - 1) / (r["end"] - r["ttft"]) for r in results if r["tokens"] > 1 and r["end"] > r["ttft"]]
    return {
        "tok_s": tokens / wall,
        "stream_tok_s": clients * statistics.mean(rates) if rates else float("nan"),
        "tokens": tokens,
        "wall": wall,
        "p50": statistics.median(ttfts),
        "p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))],
    }


def bench_model(label: str, gguf: Path, ours_dir: Path, vocab: int, args, tmp: Path, llama_server: Path | None) -> list:
    import numpy as np

    rows = []
    for n in args.clients:
        rng = np.random.default_rng(n)
        prompts = [[int(t) for t in rng.integers(3, vocab, size=args.prompt)] for _ in range(n * args.requests)]
        warm = [int(t) for t in rng.integers(3, vocab, size=args.prompt)]
        engines = [
            (
                "mixcli",
                [
                    sys.executable,
                    "-m",
                    "mixcli",
                    "serve",
                    ours_dir,
                    "--parallel",
                    n,
                    "--ctx",
                    args.ctx,
                    "--threads",
                    args.threads,
                    "--temp",
                    0,
                    "--max-queue",
                    1024,
                ],
            )
        ]
        if llama_server is not None:
            engines.append(
                (
                    "llama.cpp",
                    [
                        llama_server,
                        "-m",
                        gguf,
                        "--parallel",
                        n,
                        "-c",
                        args.ctx * n,
                        "-t",
                        args.threads,
                        "-tb",
                        args.threads,
                        "--cont-batching",
                        "--no-webui",
                        "--host",
                        "127.0.0.1",
                    ],
                )
            )
        row = {"model": label, "clients": n}
        for name, cmd in engines:
            port = free_port()
            cmd = cmd + ["--port", port]
            log(f"{label}, {n} clients: {name}")
            srv = Server(cmd, port, tmp / f"{name}-{n}.log")
            try:
                one_request(port, warm, 4)
                row[name] = run_clients(port, n, prompts, args.tokens)
            finally:
                srv.stop()
            log(
                f"  {row[name]['tok_s']:.1f} tok/s, streaming {row[name]['stream_tok_s']:.1f} tok/s, "
                f"ttft p50 {row[name]['p50']:.3f} s, p95 {row[name]['p95']:.3f} s"
            )
        rows.append(row)
    return rows


def print_table(rows: list, threads: int) -> None:
    print(
        "| model | clients (= --parallel) | mixcli decode tok/s | llama.cpp decode tok/s | ratio | "
        "mixcli streaming tok/s | llama.cpp streaming tok/s | mixcli TTFT p50 / p95 (s) | llama.cpp TTFT p50 / p95 (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, ll = r["mixcli"], r.get("llama.cpp")
        ratio = f"{o['tok_s'] / ll['tok_s']:.2f}" if ll else "-"
        lls = f"{ll['tok_s']:.1f}" if ll else "-"
        llst = f"{ll['stream_tok_s']:.1f}" if ll else "-"
        llt = f"{ll['p50']:.3f} / {ll['p95']:.3f}" if ll else "-"
        print(
            f"| {r['model']} | {r['clients']} | {o['tok_s']:.1f} | {lls} | {ratio} | {o['stream_tok_s']:.1f} | {llst} | "
            f"{o['p50']:.3f} / {o['p95']:.3f} | {llt} |"
        )
    base = {r["model"]: r["mixcli"] for r in rows if r["clients"] == 1}
    for r in rows:
        if r["clients"] > 1 and r["model"] in base:
            b = base[r["model"]]
            print(
                f"{r['model']}: {r['clients']} clients give {r['mixcli']['tok_s'] / b['tok_s']:.2f}x mixcli's "
                f"single-stream decode, {r['mixcli']['stream_tok_s'] / b['stream_tok_s']:.2f}x while streaming"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="client counts, each also the servers' --parallel")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    ap.add_argument("--ctx", type=int, default=256, help="context per sequence (llama-server gets ctx x parallel)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", type=Path, default=None, help="a local copy of the default model's GGUF")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-mixtral", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true", help="mixcli only (no llama-server build needed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]

    import host
    from quant.gguf_convert import convert_gguf

    llama_server = None
    if not args.no_llamacpp:
        import llamacpp_build

        llama_server = llamacpp_build.build(["llama-server"])["llama-server"]
    tmp = Path(tempfile.mkdtemp(prefix="mixcli-serve-bench-"))
    rows = []
    try:
        if not args.skip_default:
            from vs_llamacpp import fetch_default_gguf

            g = fetch_default_gguf(tmp, args.gguf)
            ours = tmp / "smol"
            convert_gguf(g, ours, quant="keep")
            vocab = json.loads((ours / "manifest.json").read_text())["config"]["vocab_size"]
            rows += bench_model("SmolLM2-135M Q4_1", g, ours, vocab, args, tmp, llama_server)
        if not args.skip_mixtral:
            from synth import write_random_gguf

            g = tmp / "mixtral-width-q4_0.gguf"
            write_random_gguf(g, layers=2)
            ours = tmp / "mixtral-width"
            convert_gguf(g, ours, quant="keep")
            rows += bench_model("Mixtral-width 2L Q4_0", g, ours, 32000, args, tmp, llama_server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"host: {host.describe()}; {args.threads} threads; prompt {args.prompt} tokens, max_tokens {args.tokens}, "
        f"{args.requests} requests per client, temperature 0"
    )
    print_table(rows, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

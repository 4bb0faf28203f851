"""`mixcli batch` on a local Ray cluster that this module starts once (2 CPUs, its own temporary
directory, loopback only) and stops at the end, plus a second Ray node started as its own process.

The reference is each prompt run alone through the Python API (``mixcli.stream_generate`` with
temperature 0: what `mixcli generate --temp 0` prints), on the baby chat model (random weights,
a real BPE tokenizer, a ChatML template). Batched decoding differs from it only in float rounding
(tests/test_batch.py), so the greedy texts are equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # the test extra pulls the ray extra

import mixcli
from babyruntime import baby_chat_model
from mixcli.batch_job import BatchOptions, run_batch
from mixcli.batch_ray import start_local

ROOT = Path(__file__).resolve().parent.parent
CTX = 128
WORDS = "the cat sat on the mat and the dog ran in the park while a bird sang".split()


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return baby_chat_model(tmp_path_factory.mktemp("batchray"), name="baby-batch")


@pytest.fixture(scope="module")
def reference(baby):
    return mixcli.load(baby, ctx=CTX)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module, started by the job's own code; its GCS address."""
    import shutil

    temp_dir = start_local(2)  # under /tmp: Ray's socket paths must stay short
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def prompts(n: int, seed: int = 0) -> list[dict]:
    """Raw prompts and chats of different lengths and answer limits."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        line = {"id": f"p{i}", "max_tokens": rng.randint(4, 24)}
        if i % 3 == 2:
            line["messages"] = [{"role": "user", "content": text}]
        else:
            line["prompt"] = text
        out.append(line)
    return out


def alone(model, line: dict, max_tokens: int = 256) -> dict:
    """The line as `mixcli generate --temp 0` answers it on its own."""
    prompt = line.get("messages") or line["prompt"]
    parts, last = [], None
    for r in mixcli.stream_generate(model, prompt, max_tokens=line.get("max_tokens", max_tokens), temperature=0):
        parts.append(r.text)
        last = r
    st = last.stats
    return {
        "id": line["id"],
        "text": "".join(parts),
        "finish_reason": last.finish_reason,
        "usage": {
            "prompt_tokens": st.prompt_tokens,
            "completion_tokens": st.completion_tokens,
            "total_tokens": st.prompt_tokens + st.completion_tokens,
        },
    }


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines()]


def options(baby, src, out, **kw) -> BatchOptions:
    return BatchOptions(input=src, output=out, model=str(baby), ctx=CTX, sampling={"temperature": 0.0}, **kw)


def test_answers_equal_each_prompt_alone_and_a_long_prompt_is_an_error_line(cluster, baby, reference, tmp_path):
    lines = prompts(10)
    long_text = " ".join(WORDS * 12)  # well over the 128-token context
    lines.insert(4, {"id": 99, "prompt": long_text})
    src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    seen = []
    summary = run_batch(
        options(baby, src, out, workers=2, threads_per_worker=1, parallel=3),
        notify=lambda m: None,
        on_line=lambda line, where: seen.append(where),
    )
    got = read_jsonl(out)
    assert summary.mode == "ray" and summary.written == len(lines) == len(got)
    by_id = {x["id"]: x for x in got}
    assert len(by_id) == len(got)
    err = by_id.pop(99)
    n_long = len(reference.tokenizer.encode(long_text, add_bos=reference.add_bos, parse_special=False))
    assert err == {
        "id": 99,
        "error": {
            "type": "context_length_exceeded",
            "message": f"the prompt is {n_long} tokens, the context holds {CTX} (one more is needed for the "
            "answer; raise --ctx or shorten the prompt)",
        },
    }
    for line in lines:
        if line["id"] != 99:
            assert by_id[line["id"]] == alone(reference, line), line
    assert summary.errors == 1 and sum(summary.per_node.values()) == len(lines) - 1
    assert len({w["pid"] for w in seen if w}) == 2  # both workers answered some


def test_a_worker_killed_mid_job_is_restarted_and_its_prompts_retried(cluster, baby, reference, tmp_path):
    lines = prompts(16, seed=1)
    src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    killed = []

    def kill_first_worker(line, where):
        if not killed and where is not None:
            os.kill(where["pid"], signal.SIGKILL)  # the actor's process, mid-job: it holds queued prompts
            killed.append(where["pid"])

    summary = run_batch(
        options(baby, src, out, workers=2, threads_per_worker=1, parallel=2, retries=2),
        notify=lambda m: None,
        on_line=kill_first_worker,
    )
    got = read_jsonl(out)
    assert sorted(x["id"] for x in got) == sorted(x["id"] for x in lines)  # none missing, none twice
    by_id = {x["id"]: x for x in got}
    for line in lines:
        assert by_id[line["id"]] == alone(reference, line), line
    assert summary.restarts >= 1 and summary.retried >= 1, summary


def _batch_cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "mixcli", "batch", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_resume_after_killing_the_job_half_way(cluster, baby, reference, tmp_path):
    lines = prompts(30, seed=2)
    for line in lines:
        line["max_tokens"] = 48
    src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    common = [
        baby,
        src,
        "-o",
        out,
        "--ray-address",
        cluster,
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--parallel",
        "2",
        "--temp",
        "0",
        "--ctx",
        CTX,
    ]
    job = _batch_cli(*common)
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "no output in 240 s"
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)  # no chance to clean up
    job.communicate()
    first = out.read_bytes().count(b"\n")
    assert 2 <= first < len(lines), first

    said = []  # the rest in this process (one start-up less than a second command)
    summary = run_batch(
        options(baby, src, out, workers=1, threads_per_worker=1, parallel=2, resume=True), notify=said.append
    )
    assert f"resume: {first} of {len(lines)} prompts already in {out}" in said
    assert summary.skipped == first and summary.written == len(lines) - first
    got = read_jsonl(out)
    assert sorted(x["id"] for x in got) == sorted(x["id"] for x in lines)  # no duplicate, none missing
    by_id = {x["id"]: x for x in got}
    for line in lines:
        assert by_id[line["id"]] == alone(reference, line), line


def test_without_ray_one_process_runs_the_job_and_says_how_to_get_more(baby, reference, tmp_path):
    hide = tmp_path / "noray"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(ROOT)])}
    lines = prompts(5, seed=3)
    src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    job = _batch_cli(baby, src, "-o", out, "--temp", "0", "--ctx", CTX, env=env)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert "Ray is not installed: running in this process, one worker; `pip install 'mixcli[ray]'`" in err
    by_id = {x["id"]: x for x in read_jsonl(out)}
    assert len(by_id) == len(lines)
    for line in lines:
        assert by_id[line["id"]] == alone(reference, line), line
    refused = _batch_cli(baby, src, "-o", tmp_path / "o2.jsonl", "--ray-address", "auto", env=env)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "error: --ray-address needs Ray" in err and "mixcli[ray]" in err, err


def test_two_nodes_share_the_job(cluster, baby, reference, tmp_path):
    """A second Ray node joins as its own process (`ray start --address`), with 1 CPU and a marker
    resource; two single-thread workers spread over the nodes, and each node answers prompts."""
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--address",
            cluster,
            "--num-cpus",
            "1",
            "--resources",
            '{"second_node": 1}',
            "--node-ip-address",
            "127.0.0.1",
            "--block",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            second = [n["NodeID"] for n in alive if "second_node" in n["Resources"]]
            if second:
                break
            assert node.poll() is None, node.stderr.read()
            assert time.monotonic() < deadline, "the second node did not join in 120 s"
            time.sleep(0.5)
        lines = prompts(12, seed=4)
        src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
        summary = run_batch(options(baby, src, out, workers=2, threads_per_worker=1, parallel=2), notify=print)
        print(
            "workers:",
            [(w["node"][:8], w["pid"]) for w in summary.workers],
            "per-node counts:",
            summary.per_node,
            "second node:",
            second[0][:8],
            "restarts:",
            summary.restarts,
            "errors:",
            summary.errors,
        )
        assert len(alive) == 2 and set(summary.per_node) == {n["NodeID"] for n in alive}
        assert sorted(w["node"] for w in summary.workers) == sorted(n["NodeID"] for n in alive)  # one worker each
        assert summary.per_node[second[0]] > 0 and sum(summary.per_node.values()) == len(lines)
        by_id = {x["id"]: x for x in read_jsonl(out)}
        for line in lines:
            assert by_id[line["id"]] == alone(reference, line), line
    finally:
        os.killpg(node.pid, signal.SIGTERM)  # the node's process group: ray start and what it started
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        time.sleep(1)
        try:
            os.killpg(node.pid, signal.SIGKILL)  # anything of that group still there
        except ProcessLookupError:
            pass

"""`mixcli bench` and `mixcli perplexity` on a baby Mixtral with a real (tiny) tokenizer.

bench: the table and the JSON carry one pp row and one tg row per thread count, with mean and
spread over the reps (no wall-clock assertions: only that the figures are positive and
consistent with their samples).

perplexity: the CLI's figure must equal llama.cpp's method computed here independently: the text
tokenized by Hugging Face ``tokenizers`` (not mixcli's wrapper), BOS prepended, cut into chunks
of ``ctx``, the first token of each chunk replaced by BOS, logits from ``mixcli.load(dir).logits``
on each chunk from an empty cache, numpy log-softmax, and only the second half scored
(the logits at j predict token j+1, for j in [ctx/2, ctx-1)). PPL = exp(mean NLL); the standard
error is llama.cpp's PPL * sqrt(var(NLL) / (n - 1)).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import mixcli
from babymodels import make_hf_checkpoint
from mixcli.cli import main as cli_main
from quant.convert import convert_checkpoint

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "tok_corpus.txt"
SPECIALS = ["<unk>", "<s>", "</s>"]
BOS = 1


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> tuple[Path, Path]:
    """A converted baby Mixtral whose vocabulary is a small BPE tokenizer.json trained here
    (Metaspace, as SentencePiece-style models; ``add_bos_token``: true). Returns (model, tokenizer.json)."""
    d = tmp_path_factory.mktemp("bench-ppl")
    tokdir = d / "tok"
    tokdir.mkdir()
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIALS, limit_alphabet=70, show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    assert tok.token_to_id("<s>") == BOS
    tok.save(str(tokdir / "tokenizer.json"))
    (tokdir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    src = make_hf_checkpoint(
        d / "src", "mixtral", tokenizer_dir=tokdir, vocab_size=tok.get_vocab_size(), max_position_embeddings=128
    )
    out = d / "model"
    convert_checkpoint(src, out, quant="q8_0")
    return out, tokdir / "tokenizer.json"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process (its real entry point minus sys.exit): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def text() -> str:
    """English prose from the test corpus: a few hundred tokens under the baby tokenizer."""
    lines = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.isascii() and ln.strip()]
    return "\n".join(lines)


# ---------------------------------------------------------------- bench


def test_bench_json_rows_per_thread_count(baby, capsys):
    model, _ = baby
    code, out, err = run_cli(capsys, "bench", model, "--pp", 12, "--tg", 5, "--reps", 3, "-t", "1,2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == str(model)
    rows = data["results"]
    two = min(2, numba.config.NUMBA_NUM_THREADS)  # a thread count is capped at numba's pool
    assert [(r["test"], r["threads"]) for r in rows] == [("pp12", 1), ("tg5", 1), ("pp12", two), ("tg5", two)]
    for r in rows:
        assert set(r) == {"test", "threads", "n_tokens", "reps", "mean_tps", "std_tps", "samples"}
        assert r["n_tokens"] == (12 if r["test"] == "pp12" else 5)
        assert r["reps"] == 3 and len(r["samples"]) == 3
        assert all(math.isfinite(s) and s > 0 for s in r["samples"])
        assert r["mean_tps"] == pytest.approx(np.mean(r["samples"]), rel=1e-9)
        assert r["std_tps"] == pytest.approx(np.std(r["samples"], ddof=1), rel=1e-9, abs=1e-12)
        assert r["mean_tps"] > 0 and r["std_tps"] >= 0


def test_bench_table_and_skips(baby, capsys):
    model, _ = baby
    code, out, err = run_cli(capsys, "bench", model, "--pp", 8, "--tg", 0, "--reps", 1, "-t", "1")
    assert code == 0, err
    for col in ("test", "threads", "tokens/s", "std", "reps"):
        assert col in out
    body = [ln for ln in out.splitlines() if "pp8" in ln]
    assert len(body) == 1 and "tg" not in out.split("reps", 1)[1]
    cells = [c.strip() for c in body[0].replace("\u2502", "|").split("|") if c.strip()]
    assert cells[0] == "pp8" and cells[1] == "1" and float(cells[2]) > 0 and float(cells[3]) == 0 and cells[4] == "1"


def test_bench_tg_one_token(baby, capsys):
    """tg1 is one timed decode step, as llama-bench counts it (not zero tokens)."""
    model, _ = baby
    code, out, err = run_cli(capsys, "bench", model, "--pp", 0, "--tg", 1, "--reps", 2, "-t", "1", "--json")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    assert row["test"] == "tg1" and all(s > 0 for s in row["samples"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--reps", "0"], "--reps"),
        (["-t", "one,two"], "--threads"),
        (["-t", "-1"], "--threads"),  # 0 means all physical cores, as on generate and chat
        (["--pp", "-1"], "--pp"),
    ],
)
def test_bench_bad_usage(baby, capsys, args, needle):
    code, out, err = run_cli(capsys, "bench", baby[0], *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- perplexity


def reference_perplexity(
    model_dir: Path, tokenizer_json: Path, text: str, ctx: int, max_chunks: int | None = None, act: str | None = None
):
    """llama.cpp's method, written out independently of mixcli.perplexity (``act``: the kernels'
    activation mode, None for the default)."""
    ids = [BOS] + HFTokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    n_chunks = len(ids) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    m = mixcli.load(model_dir, ctx=ctx, act=act)
    nlls = []
    for c in range(n_chunks):
        chunk = ids[c * ctx : (c + 1) * ctx]
        chunk[0] = BOS
        z = m.logits(chunk).astype(np.float64)  # [ctx, V]
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        for j in range(ctx // 2, ctx - 1):
            nlls.append(-logp[j, chunk[j + 1]])
    nll = np.array(nlls)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(nll.var() / (nll.size - 1)), n_chunks, nll.size, len(ids)


@pytest.mark.parametrize("ctx", [32, 47])
def test_perplexity_equals_exp_mean_nll(baby, text, tmp_path, capsys, ctx):
    model, tokjson = baby
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    ppl, err_ref, n_chunks, n_scored, n_ids = reference_perplexity(model, tokjson, text, ctx)
    assert n_chunks >= 3, n_ids  # the text spans several chunks, so chunking is exercised
    code, out, err = run_cli(capsys, "perplexity", model, f, "--ctx", ctx, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert got["stderr"] == pytest.approx(err_ref, rel=1e-5)
    assert (got["chunks"], got["scored_tokens"], got["ctx"]) == (n_chunks, n_scored, ctx)
    assert n_scored == n_chunks * (ctx - 1 - ctx // 2)
    assert 1.0 < ppl < 2 * 160  # a random baby: near-uniform over its vocabulary, not degenerate
    # the plain output: one line with the same figure
    code, out, err = run_cli(capsys, "perplexity", model, f, "--ctx", ctx)
    assert code == 0, err
    assert out.startswith(f"PPL = {ppl:.4f} +/- ") and f"{n_chunks} chunks of {ctx} tokens" in out


def test_perplexity_chunks_limit(baby, text, tmp_path, capsys):
    model, tokjson = baby
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    ppl, _, n_chunks, n_scored, _ = reference_perplexity(model, tokjson, text, 32, max_chunks=2)
    code, out, err = run_cli(capsys, "perplexity", model, f, "--ctx", 32, "--chunks", 2, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert (got["chunks"], got["scored_tokens"]) == (2, n_scored) and n_chunks == 2
    assert got["ppl"] == pytest.approx(ppl, rel=1e-6)


def test_perplexity_missing_file(baby, tmp_path, capsys):
    code, out, err = run_cli(capsys, "perplexity", baby[0], tmp_path / "nope.txt")
    assert code == 1 and out == ""
    assert err.startswith("error: text file") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_perplexity_text_shorter_than_one_chunk(baby, tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("The quick brown fox.", encoding="utf-8")
    code, out, err = run_cli(capsys, "perplexity", baby[0], f, "--ctx", 64)
    assert code == 2 and out == ""
    assert "fewer than one chunk of --ctx 64" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ctx, needle", [(2, "at least 4"), (1024, "exceeds the model's loaded context 128")])
def test_perplexity_bad_ctx(baby, text, tmp_path, capsys, ctx, needle):
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    code, out, err = run_cli(capsys, "perplexity", baby[0], f, "--ctx", ctx)
    assert code == 2 and out == "" and needle in err, err


def test_perplexity_not_utf8(baby, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    code, out, err = run_cli(capsys, "perplexity", baby[0], f)
    assert code == 1 and "not UTF-8" in err


def test_perplexity_subprocess_exit_code(baby, tmp_path):
    """The installed entry point: a missing file is one error line and exit status 1."""
    r = subprocess.run(
        [sys.executable, "-m", "mixcli", "perplexity", str(baby[0]), str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: text file") and len(r.stderr.strip().splitlines()) == 1

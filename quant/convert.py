"""Convert a Hugging Face checkpoint directory into a mixcli model directory.

One tensor at a time, a row chunk at a time: a thread reads the next chunks of the source while
the current one is quantized and a writer thread writes and hashes the last; so peak memory is a
few chunks however large the checkpoint, and disk and CPU work at the same time.

All-or-nothing: everything is written into a hidden temporary directory beside the output
(``.<name>.partial-<pid>-<start>``) and renamed into place only when complete. Any exception,
Ctrl-C included, removes the temporary directory; with ``force`` an existing output is replaced
only after the new one is complete. A crash that skips Python's cleanup (SIGKILL, power loss) can
leave a ``.partial-`` directory, never something that looks like a model, and the next run into
that directory removes it (``quant.leftovers``). One conversion per output at a time: a second
refuses while the first holds the output's lock (``quant.locks``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import locks, q4
from .errors import ArgumentError, CheckpointError, ConversionInterrupted, OutputError
from .formats import (
    QK,
    QUANT_PRESETS,
    TOKENIZER_FILES,
    fallback_type,
    role_of,
    row_tiled,
)
from .leftovers import process_tag, sweep
from .sources.hf import HFCheckpoint, open_hf_checkpoint

# (tensor_name, tensors_done, tensors_total, bytes_done, bytes_total), bytes of the source
Progress = Callable[[str, int, int, int, int], None]


@dataclass(frozen=True)
class ConvertSummary:
    out: Path
    quant: str
    params: int
    bits_per_weight: float
    bytes_on_disk: int
    seconds: float
    max_abs_err: float
    max_err_tensor: str | None
    source_bytes: int
    # a GGUF import: the GGUF names of the tensors whose blocks were decoded and quantized again
    # (empty: every block kept as it was); None for a checkpoint, whose floats are all quantized
    requantized: tuple[str, ...] | None = None


def storage_type(name: str, shape: tuple[int, ...], preset: str) -> str:
    """The storage type of a tensor under a preset: by role, f16 when K does not fit the block,
    row-tiled (``formats.row_tiled``) when N is a multiple of 16."""
    qtype = QUANT_PRESETS[preset][role_of(name)]
    return row_tiled(fallback_type(qtype, shape[-1]), shape[0]) if len(shape) == 2 else qtype


def tokenizer_section(src: Path, arch: str) -> dict[str, Any] | None:
    """The manifest's "tokenizer" section (see the schema in quant.formats), None without one."""
    if (src / "tokenizer.model").is_file():
        kind, file = "sentencepiece", "tokenizer.model"
    elif (src / "tokenizer.json").is_file():
        kind, file = "hf-json", "tokenizer.json"
    else:
        return None

    def load(name: str) -> dict[str, Any]:
        p = src / name
        if not p.is_file():
            return {}
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{p} is not valid JSON ({exc})", "download it again from the model's Hugging Face repo"
            ) from None
        return data if isinstance(data, dict) else {}

    tc, stm, gen = load("tokenizer_config.json"), load("special_tokens_map.json"), load("generation_config.json")

    def token(key: str) -> str | None:
        v = tc.get(key, stm.get(key))
        if isinstance(v, dict):  # a serialized AddedToken
            v = v.get("content")
        return v if isinstance(v, str) else None

    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    family = None
    if isinstance(template, str):
        family = "mistral" if "[INST]" in template else "chatml" if "<|im_start|>" in template else None
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = kind == "sentencepiece" and arch in ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")
    eos = token("eos_token")
    extra_eos: list[str] = []
    gen_eos = gen.get("eos_token_id")
    decoder = tc.get("added_tokens_decoder") or {}
    for tid in gen_eos if isinstance(gen_eos, list) else []:
        content = (decoder.get(str(tid)) or {}).get("content")
        if isinstance(content, str) and content != eos and content not in extra_eos:
            extra_eos.append(content)
    return {
        "kind": kind,
        "file": file,
        "config_file": "tokenizer_config.json" if (src / "tokenizer_config.json").is_file() else None,
        "bos_token": token("bos_token"),
        "eos_token": eos,
        "add_bos": add_bos,
        "extra_eos_tokens": extra_eos,
        "chat_template": template if isinstance(template, str) else None,
        "template_family": family,
    }


def planned_bytes(ckpt: HFCheckpoint, preset: str) -> int:
    """Bytes the output will take (for the free-space check and the disk-full message)."""
    total = 0
    for name, t in ckpt.tensors.items():
        n, k = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (1, t.shape[0])
        total += q4.nbytes(storage_type(name, t.shape, preset), n, k) + 4096
    return total


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _disk_full(out: Path, need: int) -> OutputError:
    free = _free_bytes(out.parent)
    short = max(need - free, 0) / 1e9
    return OutputError(
        f"disk full while writing {out} (needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free now)",
        f"free {max(short, 0.1):.1f} GB and retry, or convert to another disk with -o",
    )


def _remove(path: Path) -> None:
    """Remove a file or directory tree, finishing even if Ctrl-C arrives meanwhile."""
    for _ in range(3):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
            return
        except KeyboardInterrupt:
            continue


def _write_model(ckpt: HFCheckpoint, tmp: Path, quant: str, src: Path, progress: Progress | None) -> dict[str, Any]:
    from .writer import ModelWriter, warm_quantizers  # numba: imported while ckpt.warm() reads

    cfg = ckpt.config
    names = list(ckpt.tensors)
    total_bytes = ckpt.nbytes
    done_bytes = 0
    with ModelWriter(tmp) as writer:
        chunks = []
        for name in names:
            shape = ckpt.tensors[name].shape
            n, step = (shape[0] if len(shape) == 2 else 1), writer.row_step(shape[-1])
            chunks += [(name, a, min(n, a + step)) for a in range(0, n, step)]
        warm_quantizers({(ckpt.tensors[n].dtype, storage_type(n, ckpt.tensors[n].shape, quant)) for n in names})
        ckpt.plan(chunks)  # the reader works ahead of the quantizer, in this exact order
        for i, name in enumerate(names):
            t = ckpt.tensors[name]
            qtype = storage_type(name, t.shape, quant)
            if name.endswith(".w1") and ".experts." in name:
                layer, expert = int(name.split(".")[1]), int(name.split(".")[3])
                region = sum(q4.nbytes(storage_type(name, t.shape, quant), *t.shape) + 4096 for _ in range(3))
                writer.begin_expert(layer, expert, region)
            nrows = t.shape[0] if len(t.shape) == 2 else 1
            row_bytes = t.nbytes // nrows

            def on_chunk(
                rows_done: int,
                rows_total: int,
                name: str = name,
                i: int = i,
                base: int = done_bytes,
                rb: int = row_bytes,
            ) -> None:
                if progress is not None:
                    progress(name, i, len(names), base + rows_done * rb, total_bytes)

            writer.add_tensor(
                name,
                qtype,
                t.shape,
                lambda a, b, name=name: ckpt.rows(name, a, b),
                progress=on_chunk,
                label=t.hf_name,
            )
            done_bytes += t.nbytes
            if name.endswith(".w2") and ".experts." in name:
                writer.end_expert()
            if progress is not None:
                progress(name, i + 1, len(names), done_bytes, total_bytes)
        for fname in TOKENIZER_FILES:
            if (src / fname).is_file():
                shutil.copyfile(src / fname, tmp / fname)
        preset = QUANT_PRESETS[quant]
        return writer.finish(
            cfg,
            {"preset": quant, "types": dict(preset), "group": QK},
            tokenizer_section(src, cfg.architecture),
            {"kind": "hf-safetensors", "path": str(src), "dtype": ckpt.dtype},
        )


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    quant: str = "q4_0",
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Convert the HF checkpoint directory ``src`` into ``out``; see the module docstring."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if quant not in QUANT_PRESETS:
        raise ArgumentError(f"unknown quantization {quant!r}", f"choose one of {', '.join(QUANT_PRESETS)}")
    with output_lock(out):
        if out.exists() or out.is_symlink():
            if not force:
                raise OutputError(f"output {out} already exists", "pass --force to replace it, or choose another -o")
            if src.exists() and (src.resolve() == out.resolve() or out.resolve() in src.resolve().parents):
                raise ArgumentError(
                    f"output {out} contains the source checkpoint {src}", "choose an output outside the checkpoint"
                )
        ckpt = open_hf_checkpoint(src)
        with ckpt:
            ckpt.warm()  # the disk starts now; the quantizer (numba) loads meanwhile
            need = planned_bytes(ckpt, quant)
            manifest = install_model_dir(out, need, lambda tmp: _write_model(ckpt, tmp, quant, src, progress))
    stats = manifest["stats"]
    on_disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ConvertSummary(
        out=out,
        quant=quant,
        params=stats["params"],
        bits_per_weight=stats["bits_per_weight"],
        bytes_on_disk=on_disk,
        seconds=time.perf_counter() - t0,
        max_abs_err=stats["max_abs_err"],
        max_err_tensor=stats.get("max_err_tensor"),
        source_bytes=ckpt.nbytes,
    )


def install_model_dir(out: Path, need: int, write: Callable[[Path], dict]) -> dict:
    """Run ``write(tmp)`` into a hidden sibling of ``out`` and move it into place only once it
    verifies, so an interrupted, failed or disk-full conversion never leaves a directory that
    looks like a model. Returns what ``write`` returned (the manifest)."""
    created: list[Path] = []  # parent directories we made, removed again on failure
    tmp = out.parent / f".{out.name}.partial-{process_tag()}"
    try:
        parent = out.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep(out.parent, notify=_stderr)  # what a killed conversion left here (quant.leftovers)
        free = _free_bytes(out.parent)
        if free < need:
            raise OutputError(
                f"not enough disk space for {out}: needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free",
                f"free {(need - free) / 1e9:.1f} GB and retry, or convert to another disk with -o",
            )
        _remove(tmp)
        manifest = write(tmp)
        from .writer import verify_model_dir

        verify_model_dir(tmp, check_sha=False)
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{process_tag()}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _remove(old)
        else:
            os.replace(tmp, out)
    except KeyboardInterrupt:
        _cleanup(tmp, created)
        raise ConversionInterrupted(
            f"conversion to {out} interrupted; nothing was written", "run the command again"
        ) from None
    except OSError as exc:
        _cleanup(tmp, created)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(out, need) from None
        raise OutputError(
            f"cannot write {out}: {exc.strerror or exc}", "check the output path and its permissions"
        ) from None
    except BaseException:
        _cleanup(tmp, created)
        raise
    return manifest


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock (quant.locks) while checking and writing it: a second convert or pull to
    the same output refuses at once instead of racing the first to the final rename. Parent
    directories made for the lock go again if the conversion fails."""
    created = [p for p in out.parents if not p.exists()]
    try:
        with locks.exclusive(out):
            yield
    except locks.Busy as exc:
        raise OutputError(
            f"another mixcli (process {exc.holder}) is writing {out} right now",
            "wait for it to finish, or choose another -o",
        ) from None
    except BaseException:
        _remove_empty_dirs(created)
        raise


def _cleanup(tmp: Path, created: list[Path]) -> None:
    _remove(tmp)
    _remove_empty_dirs(created)


def _remove_empty_dirs(created: list[Path]) -> None:
    for d in created:  # innermost first; only if still empty
        try:
            d.rmdir()
        except OSError:
            break

"""What CPU a benchmark ran on, and the llama.cpp build flags that match it.

Every speed figure names its host: the CPU model and the instruction sets that matter to the
kernels of either engine. llama.cpp must be built for the host it runs on: an AVX-512 build dies
with SIGILL on an AVX2-only machine, and GGML_NATIVE would tune for the build machine instead.
"""

from __future__ import annotations

import hashlib
import platform

# /proc/cpuinfo flag -> the name we print; the order is the order of importance for the tiers
ISA_FLAGS = (
    ("avx2", "avx2"),
    ("fma", "fma"),
    ("f16c", "f16c"),
    ("avx_vnni", "avxvnni"),
    ("avx512f", "avx512f"),
    ("avx512bw", "avx512bw"),
    ("avx512vl", "avx512vl"),
    ("avx512_vnni", "avx512vnni"),
    ("avx512_bf16", "avx512bf16"),
    ("gfni", "gfni"),
    ("amx_int8", "amx-int8"),
    ("asimd", "neon"),
    ("asimddp", "dotprod"),
    ("i8mm", "i8mm"),
    ("sve", "sve"),
)


def cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, flag set) from /proc/cpuinfo; ('unknown', {}) where there is none."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("unknown", "", platform.machine()):
            model = val.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(val.split())
    return model, flags


def isa_list(flags: set[str] | None = None) -> list[str]:
    """The instruction sets of ISA_FLAGS the host has, by our names."""
    flags = cpuinfo()[1] if flags is None else flags
    return [name for flag, name in ISA_FLAGS if flag in flags]


def describe() -> str:
    """One line: 'AMD EPYC (x86_64; avx2 fma f16c ...)'."""
    model, flags = cpuinfo()
    return f"{model} ({platform.machine()}; {' '.join(isa_list(flags)) or 'no SIMD flags read'})"


def llamacpp_cmake_args(flags: set[str] | None = None) -> str:
    """GGML cmake flags for exactly the host's instruction sets (GGML_NATIVE off, each set named)."""
    flags = cpuinfo()[1] if flags is None else flags
    args = ["-DGGML_NATIVE=OFF"]
    if platform.machine() in ("x86_64", "AMD64"):
        has = lambda f: "ON" if f in flags else "OFF"  # noqa: E731
        args += [
            f"-DGGML_AVX={has('avx')}",
            f"-DGGML_AVX2={has('avx2')}",
            f"-DGGML_FMA={has('fma')}",
            f"-DGGML_F16C={has('f16c')}",
            f"-DGGML_AVX_VNNI={has('avx_vnni')}",
            f"-DGGML_AVX512={has('avx512f')}",
            f"-DGGML_AVX512_VNNI={has('avx512_vnni')}",
            f"-DGGML_AVX512_BF16={has('avx512_bf16')}",
        ]
    return " ".join(args)


def build_key(flags: set[str] | None = None) -> str:
    """A short tag for build directories: one llama.cpp build per distinct flag set."""
    return hashlib.sha256(llamacpp_cmake_args(flags).encode()).hexdigest()[:10]


if __name__ == "__main__":
    print(describe())
    print(llamacpp_cmake_args())

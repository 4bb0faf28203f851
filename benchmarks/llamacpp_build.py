"""llama.cpp's own tools (llama-bench, llama-server, ...) built for this host.

The sources come from the llama-cpp-python sdist on the package registry, which carries llama.cpp
in ``vendor/llama.cpp``; they are built with cmake using exactly the host's instruction sets
(``host.llamacpp_cmake_args``), once per flag set, under ~/.cache/mixcli-bench (override with
MIXCLI_LLAMACPP_BUILD). Nothing of llama.cpp is committed here.

    python benchmarks/llamacpp_build.py llama-bench llama-server   # prints the binaries' paths
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
ROOT = Path(os.environ.get("MIXCLI_LLAMACPP_BUILD", Path.home() / ".cache/mixcli-bench"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sources() -> Path:
    """vendor/llama.cpp of the sdist, unpacked once."""
    src = ROOT / "llama-cpp-python-src"
    lcpp = src / "vendor" / "llama.cpp"
    if (lcpp / "CMakeLists.txt").exists():
        return lcpp
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                LLAMA_CPP_PYTHON,
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("*.tar.gz"))
        part = Path(tempfile.mkdtemp(dir=ROOT if ROOT.exists() else None))
        with tarfile.open(sdist) as tf:
            tf.extractall(part, filter="data")
        top = next(part.iterdir())
        shutil.rmtree(src, ignore_errors=True)
        top.rename(src)
        shutil.rmtree(part, ignore_errors=True)
    return lcpp


def build(targets: list[str]) -> dict[str, Path]:
    """{target: binary path}, building what is missing for this host's flag set."""
    ROOT.mkdir(parents=True, exist_ok=True)
    bdir = ROOT / f"llama.cpp-build-{host.build_key()}"
    bins = {t: bdir / "bin" / t for t in targets}
    missing = [t for t, p in bins.items() if not p.exists()]
    if missing:
        src = sources()
        args = host.llamacpp_cmake_args().split()
        log(f"building llama.cpp {' '.join(missing)} for this host ({' '.join(args)}); several minutes...")
        subprocess.run(
            [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(bdir),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                *args,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["cmake", "--build", str(bdir), "-j", str(os.cpu_count() or 2), "--target", *missing],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return bins


if __name__ == "__main__":
    for name, path in build(sys.argv[1:] or ["llama-bench"]).items():
        print(f"{name}\t{path}")

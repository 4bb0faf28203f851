"""The mutation fuzzer at full size: N mutated manifests, N/4 damaged data files, N mutated GGUF
headers, each case in a forked child (tests/fuzzing.py has the machinery; tests/test_fuzz.py runs
a few hundred cases of it in the suite).

    python benchmarks/fuzz.py [--n 4000] [--seed 0]

Prints the table of issue 21 (tried / ok / refused cleanly / other exceptions / signals / hangs /
memory / leftovers); every row should hold only ok and refused cleanly. Exit 1 otherwise, after
listing the first unclean cases.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # each case is tiny; one thread per child
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzing

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--n" or a.startswith("--n=") for a in argv):
        argv = ["--n", "4000", *argv]
    sys.exit(fuzzing.main(argv))

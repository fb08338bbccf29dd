"""The Rust core's unsafe code (SIMD kernels, raw writes into output buffers) under valgrind's
memcheck: runs pytest on CPU test files inside valgrind and fails on any invalid read, write or
free whose stack passes through sparseroute's compiled core.

    python scripts/memcheck.py [pytest arguments]   (make memcheck; default: the CPU op tests)

Errors elsewhere are reported as a count only: the dynamic loader, glibc's vectorised string
functions and CPython read a few bytes past their blocks by design, and memcheck flags them.
Valgrind cannot run AVX-512, so the kernels run at ``SPARSEROUTE_SIMD=avx2`` unless the
environment names a level (``baseline`` tests the scalar code); torch runs its default CPU
kernels (``ATEN_CPU_CAPABILITY=default``) for the same reason. Memcheck makes everything
30-60x slower: importing torch alone takes minutes, the default test files ten to twenty.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: CPU tests of the ops whose kernels use unsafe code (gating's SIMD, dispatch's raw writes).
DEFAULT_TESTS = [
    "test_gating.py",
    "test_topp.py",
    "test_expert_choice.py",
    "test_dispatch.py",
    "test_capacity.py",
    "test_balance.py",
    "test_sinkhorn.py",
    "test_tokens.py",
    "test_layers.py",
    "test_placement.py",
]

#: Tests that time threads against each other: valgrind runs one thread at a time.
DESELECTED = ["test_placement.py::test_the_gil_is_released_while_planning"]

#: The first line of each memory error record that counts (uninitialised values are off:
#: torch and numpy hand out uninitialised outputs that are written before they are read).
ERROR_KINDS = re.compile(
    r"Invalid (read|write|free)|Mismatched free|Source and destination overlap|Syscall param"
)

#: Where a frame is sparseroute's compiled core (the extension module's file name).
CORE = "_core.abi3.so"


def error_records(log: str) -> list[list[str]]:
    """The memory error records of a memcheck log: each a list of its lines without the
    ``==pid==`` prefix, from the kind of error to the last frame of its stacks."""
    records: list[list[str]] = []
    current: list[str] | None = None
    for line in log.splitlines():
        body = re.sub(r"^==\d+==\s?", "", line)
        if ERROR_KINDS.match(body):
            current = [body]
            records.append(current)
        elif current is not None and body.strip():
            current.append(body)
        else:
            current = None
    return records


def core_errors(records: list[list[str]]) -> list[list[str]]:
    """The records with a frame in sparseroute's core."""
    return [record for record in records if any(CORE in line for line in record)]


def main(arguments: list[str]) -> int:
    python = os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY="default",
        PYTHONMALLOC="malloc",
        SPARSEROUTE_SIMD=os.environ.get("SPARSEROUTE_SIMD", "avx2"),
    )
    with tempfile.TemporaryDirectory() as folder:
        log_path = Path(folder) / "memcheck.%p.log"
        command = [
            "valgrind",
            "--tool=memcheck",
            "--undef-value-errors=no",
            "--error-limit=no",
            "--num-callers=40",
            f"--log-file={log_path}",
            python,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            *(arguments or DEFAULT_TESTS),
            *(f"--deselect={test}" for test in DESELECTED),
        ]
        tests = subprocess.run(command, cwd=ROOT / "tests", env=env)
        logs = "\n".join(path.read_text() for path in Path(folder).glob("memcheck.*.log"))
    records = error_records(logs)
    ours = core_errors(records)
    for record in ours:
        print("\n".join(record), end="\n\n")
    print(
        f"memcheck: {len(ours)} error(s) in sparseroute's core, "
        f"{len(records) - len(ours)} elsewhere (loader, libc, CPython; not ours)"
    )
    return 1 if ours or tests.returncode else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

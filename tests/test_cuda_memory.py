"""The CUDA kernels touch no memory outside their tensors, move 16-byte words only at 16-byte
aligned addresses, and do nothing that C++ leaves undefined. On a GPU, a read past a tensor's
end returns whatever lies there (or faults), a write past it corrupts a neighbour, and a
misaligned 16-byte access faults: none of it shows in the emulated results on the host, whose
threads read the neighbouring heap memory silently. Undefined operations (a shift by the
width of its type or more, a signed overflow, a float converted to an integer it does not
fit) may give the intended result on one compiler and not on another. So the emulated kernel
tests (test_cuda_emulated.py) run again with the kernels built under AddressSanitizer and
UndefinedBehaviorSanitizer (its default checks, alignment among them, and float-to-integer
overflow): torch's tensors then have poisoned zones around them, the kernels' shared and
local arrays too, and any access there, any word at an address that is not a multiple of
16, or any undefined operation ends the process with a report. It is the host's counterpart
of compute-sanitizer's memcheck, and more.

Three positive controls: the select kernel made to read one score past its row, a token
gather made to move words of a tensor that starts 2 bytes off alignment, and the select
kernel's mask of lower lanes made to shift by 32 in lane 31.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import cuda_emulation

HERE = pathlib.Path(__file__).resolve().parent

#: Without launch records (test_cuda_emulated.py did not run before in this session), the
#: whole file runs under the sanitizers: about twice its plain time.
ALL_EMULATED_TESTS = ["test_cuda_emulated.py"]


def memory_tests() -> list[str]:
    """The emulated tests to rerun: those of this session's run of test_cuda_emulated.py
    that between them make every kind of launch it made (each kernel, in each element type,
    block size, one block or more, and combination of flag arguments): about a tenth of its
    time. Recorded by conftest.py, so a new test or kernel joins the choice by itself."""
    return cuda_emulation.covering_tests(cuda_emulation.launches_by_test) or ALL_EMULATED_TESTS


#: The select kernel reading its scores up to and including position `length`: one past the
#: end of the last row.
SCAN = "for (i64 p = threadIdx.x; p < length; p += threads) {"
OVERRUNNING_SCAN = SCAN.replace("p < length", "p <= length")


def mutated_select(old: str, new: str) -> str:
    """A script that runs the select kernel once, with ``old`` replaced by ``new`` in its
    source (the kernels' copy goes to the folder named by its first argument)."""
    return f"""
import sys
import pytest, torch
import cuda_emulation
from sparseroute import _cuda_ops

cuda_emulation.use_mutated_kernels(sys.argv[1], "tokens.cu", {old!r}, {new!r})
scores = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
with pytest.MonkeyPatch.context() as patch, cuda_emulation.emulated_cuda(patch):
    _cuda_ops.select_tokens_cuda(scores, 10, "top", 0.0, None)
"""


OVERRUN = mutated_select(SCAN, OVERRUNNING_SCAN)

#: The compaction's mask of the lanes below a lane, made to take the lane too by shifting one
#: bit further: in lane 31, 1u << 32, undefined in C++ as in CUDA C++ (the hardware's shift
#: gives 0 there, a compiler may assume it never happens).
LANE_MASK = "const unsigned lanes_below = (1u << lane) - 1u;"
OVERSHIFT = mutated_select(LANE_MASK, LANE_MASK.replace("(1u << lane)", "(1u << (lane + 1u))"))

#: A gather of token rows told to move 16-byte words although its bfloat16 input starts two
#: bytes past a multiple of 16 (the glue would move elements).
MISALIGNED = """
import pytest, torch
import cuda_emulation
from sparseroute import _cuda_ops

storage = torch.randn(2 * 6 * 8 + 1).to(torch.bfloat16)
x = storage[1:].view(2, 6, 8)
assert x.data_ptr() % 16 != 0 and x.is_contiguous()
indices = torch.tensor([[0, 3], [1, 5]])
with pytest.MonkeyPatch.context() as patch, cuda_emulation.emulated_cuda(patch):
    patch.setattr(_cuda_ops, "_vectorized", lambda row_len, *tensors: True)
    _cuda_ops.gather_tokens_cuda(x, indices, None)
"""


def run_sanitized(command: list[str], logs: pathlib.Path) -> subprocess.CompletedProcess:
    library = cuda_emulation.sanitizer_runtime("libasan.so")
    if library is None or cuda_emulation.sanitizer_runtime("libubsan.so") is None:
        pytest.skip("g++ has no AddressSanitizer or UndefinedBehaviorSanitizer runtime")
    env = dict(
        os.environ,
        LD_PRELOAD=library,
        SPARSEROUTE_EMULATION_SANITIZER="address,undefined,float-cast-overflow",
        # Python and torch keep memory to the end of the process: no leak report.
        ASAN_OPTIONS=f"detect_leaks=0 halt_on_error=1 exitcode=67 log_path={logs}/asan",
        UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1 exitcode=68",
    )
    result = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, timeout=1800)
    if "ASan runtime does not come first" in result.stderr:
        pytest.skip(f"AddressSanitizer cannot run here: {result.stderr.strip()[:300]}")
    return result


def reports(folder: pathlib.Path, result: subprocess.CompletedProcess) -> str:
    """The sanitizers' reports: AddressSanitizer's log files, and UBSan's, which it writes to
    the standard error when it runs inside AddressSanitizer's runtime."""
    logs = "".join(path.read_text() for path in sorted(folder.glob("asan*")))
    ubsan = result.stderr[result.stderr.find("runtime error:") :] if "runtime error:" in result.stderr else ""
    return logs + ubsan


def test_the_kernels_stay_inside_their_tensors(tmp_path):
    tests = memory_tests()
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    result = run_sanitized(command, tmp_path)
    found = reports(tmp_path, result)
    assert not found, found[:6000]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if tests != ALL_EMULATED_TESTS:
        assert re.search(rf"(^|\s){len(tests)} passed", result.stdout), result.stdout[-3000:]


@pytest.mark.parametrize(
    ("script", "exit_code", "expected"),
    [
        (OVERRUN, 67, ("heap-buffer-overflow", "sr_select_tokens")),
        (OVERSHIFT, 68, ("shift exponent 32 is too large", "tokens.cu")),
    ],
    ids=["read-past-a-row", "shift-past-the-width"],
)
def test_a_mutated_select_kernel_is_reported(tmp_path, script, exit_code, expected):
    work = tmp_path / "kernels"
    work.mkdir()
    result = run_sanitized([sys.executable, "-c", script, str(work)], tmp_path)
    found = reports(tmp_path, result)
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert all(text in found for text in expected), found[:3000]


def test_a_misaligned_word_is_reported(tmp_path):
    result = run_sanitized([sys.executable, "-c", MISALIGNED], tmp_path)
    found = reports(tmp_path, result)
    assert result.returncode == 68, result.stderr[-3000:]
    assert "misaligned address" in found and "requires 16 byte alignment" in found

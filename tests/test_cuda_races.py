"""The CUDA kernels have no data races. The emulated kernel tests (test_cuda_emulated.py) whose
kernels share memory between the threads of a block (shared arrays, barriers, block-wide
reductions and scans) run again with the kernels built under ThreadSanitizer: it reports any
two accesses to the same shared or global memory, from different threads, that no barrier or
atomic orders. A missing ``__syncthreads()`` can leave the emulated results right (the host's
threads happen to run in a good order) and still fail on a GPU; here it fails the test. The
positive control removes one barrier from the select kernel and expects the report.

The Rust core and torch run single-threaded in these processes (OMP_NUM_THREADS=1): their
thread pools are not instrumented, so ThreadSanitizer could not see how they hand work over.
"""

import os
import pathlib
import subprocess
import sys

import pytest

import cuda_emulation

HERE = pathlib.Path(__file__).resolve().parent

#: Emulated tests of every kernel whose threads share memory, one or two cases each (each
#: thread of a block is a host thread, which ThreadSanitizer makes slow: the larger cases of
#: these tests take minutes): the select kernel, the plan kernels (dropless in one block and
#: chunked, block-aligned, capacity), the expert counts, the grouped GEMM's group layout,
#: Sinkhorn, replica_map, the score sums, and the gating kernels' block-wide reductions and
#: shared key cache.
RACE_TESTS = [
    "test_select_tokens_in_full_blocks",
    "test_select_tokens_over_several_chunks",
    "test_permute_plan_is_the_cpu_plan[one block-True-300-4-64]",
    "test_permute_plan_is_the_cpu_plan[chunked-True-300-4-64]",
    "test_permute_plan_over_many_chunks",
    "test_block_aligned_plan_is_the_cpu_plan[one block-16-37-2-3]",
    "test_block_aligned_plan_is_the_cpu_plan[chunked-2-37-2-3]",
    "test_capacity_plan_is_the_cpu_plan[True-probs-300-4-64-3]",
    "test_capacity_plan_is_the_cpu_plan[False-position-64-4-8-40]",
    "test_expert_counts_are_the_cpu_counts[True-2300-2-37-1100]",
    "test_expert_counts_are_the_cpu_counts[False-700-3-5000-300]",
    "test_group_layout_kernel_scans_across_tiles",
    "test_sinkhorn_is_the_cpu_sinkhorn_bit_for_bit[37-8-None]",
    "test_replica_map_matches_the_cpu[12-4-load]",
    "test_replica_map_matches_the_cpu[10000-100-round_robin]",
    "test_score_sums_and_gradient_match_the_cpu_kernels[float32-softmax-40-70-3-True]",
    "test_gating_matches_the_cpu_kernel[warp-softmax-True-600-4-dtype0]",
    "test_bias_and_group_limit[2-sigmoid-64-8-3-8-dtype0]",
    "test_gating_backward_matches_the_cpu_kernel[softmax-True-700-dtype0]",
]

#: The positive control: the select kernel without the barrier between its histogram adds
#: and the pick of a bin, run over 3000 tokens (12 warps per block; with a few warps the
#: adds' own atomics tend to order the racing accesses, and ThreadSanitizer sees no race).
BARRIER = "        __syncthreads();\n        if (warp == 0) {\n          choose_bin("
WITHOUT_BARRIER = BARRIER.replace("        __syncthreads();\n", "")
CONTROL = f"""
import sys
import pytest, torch
import cuda_emulation
from sparseroute import _cuda_ops

cuda_emulation.use_mutated_kernels(sys.argv[1], "tokens.cu", {BARRIER!r}, {WITHOUT_BARRIER!r})
logits = torch.randint(0, 5, (3000, 3), generator=torch.Generator().manual_seed(6)).float()
with pytest.MonkeyPatch.context() as patch, cuda_emulation.emulated_cuda(patch):
    _cuda_ops.expert_choice_cuda(logits, 1000)
"""


def run_sanitized(command: list[str], reports: pathlib.Path) -> subprocess.CompletedProcess:
    library = cuda_emulation.sanitizer_runtime("libtsan.so")
    if library is None:
        pytest.skip("g++ has no ThreadSanitizer runtime (libtsan)")
    env = dict(
        os.environ,
        LD_PRELOAD=library,
        OMP_NUM_THREADS="1",
        SPARSEROUTE_EMULATION_SANITIZER="thread",
        TSAN_OPTIONS=f"halt_on_error=1 exitcode=66 log_path={reports}/tsan",
    )
    result = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, timeout=1500)
    if "FATAL: ThreadSanitizer" in result.stderr and not list(reports.glob("tsan*")):
        pytest.skip(f"ThreadSanitizer cannot run here: {result.stderr.strip()[:300]}")
    return result


def test_the_kernels_that_share_memory_have_no_data_races(tmp_path):
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    tests = [f"test_cuda_emulated.py::{test}" for test in RACE_TESTS]
    result = run_sanitized([*command, *tests], tmp_path)
    reports = sorted(tmp_path.glob("tsan*"))
    assert not reports, reports[0].read_text()[:6000]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(RACE_TESTS)} passed" in result.stdout


def test_a_missing_barrier_is_reported(tmp_path):
    work = tmp_path / "kernels"
    work.mkdir()
    result = run_sanitized([sys.executable, "-c", CONTROL, str(work)], tmp_path)
    reports = sorted(tmp_path.glob("tsan*"))
    assert result.returncode == 66, result.stderr[-3000:]
    assert reports and "data race" in reports[0].read_text()
    assert "choose_bin" in reports[0].read_text()

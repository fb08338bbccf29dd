"""The CUDA backend without a GPU: the kernel sources ship in the installed wheel, every
module compiles through NVRTC for sm_80 and sm_90 (and each source for sm_75 and sm_120)
with exactly the loader's options and no warnings, no kernel keeps data in local memory, the
row kernels move 16-byte words, the order-fixed kernels compile without fused
multiply-adds or flush-to-zero, cuda/README.md's table names every source and kernel, and
CUDA tensors get the documented errors when CuPy is missing."""

import base64
import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparseroute
from sparseroute import _cuda, _cuda_ops

ARCHS = ["sm_80", "sm_90"]
MODULE_IDS = [f"{file}-{str(dtype).removeprefix('torch.')}" for file, dtype in _cuda.module_keys()]


# --- the sources in the wheel --------------------------------------------------------------------


def test_sources_ship_inside_the_installed_package():
    kernel_dir = _cuda.kernel_dir()
    assert kernel_dir.parent == pathlib.Path(sparseroute.__file__).parent
    expected = {*_cuda.MODULES, *_cuda.HEADERS}
    assert expected <= {path.name for path in kernel_dir.iterdir()}
    # Listed in the installed distribution's RECORD: they were in the wheel pip installed.
    recorded = {str(path) for path in importlib.metadata.files("sparseroute") or []}
    assert {f"sparseroute/cuda/{name}" for name in expected} <= recorded


def _record_hash(path: pathlib.Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_the_built_wheel_contains_the_sources():
    """dist/ holds the wheel `make wheel` built and installed (checked by the hash of the
    installed sparseroute/_cuda.py in the wheel's RECORD); it must carry the sources."""
    wheels = sorted((pathlib.Path(__file__).parents[1] / "dist").glob("sparseroute-*.whl"))
    if not wheels:
        pytest.skip("no wheel in dist/ (make wheel builds one)")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        names = set(wheel.namelist())
        record = next(name for name in names if name.endswith(".dist-info/RECORD"))
        lines = wheel.read(record).decode().splitlines()
    installed = _record_hash(pathlib.Path(_cuda.__file__))
    if not any(line.startswith(f"sparseroute/_cuda.py,{installed},") for line in lines):
        pytest.skip(f"{wheels[-1].name} is not the wheel installed here (built from other sources)")
    assert {f"sparseroute/cuda/{name}" for name in (*_cuda.MODULES, *_cuda.HEADERS)} <= names


def test_every_launched_kernel_is_defined_in_its_source():
    defined = {name for file in _cuda.MODULES for name in _cuda.kernel_names(file)}
    launched = set(re.findall(r'"(sr_\w+)"', pathlib.Path(_cuda_ops.__file__).read_text()))
    assert launched and launched <= defined


def _expand_braces(text: str) -> list[str]:
    """``sr_x_team{2,4}`` -> ``sr_x_team2``, ``sr_x_team4`` (one brace group per name)."""
    match = re.search(r"\{([^}]*)\}", text)
    if match is None:
        return [text]
    return [text[: match.start()] + part + text[match.end() :] for part in match.group(1).split(",")]


def test_the_kernel_table_names_every_source_and_kernel():
    """cuda/README.md's table has a row for each source, naming exactly its kernels."""
    readme = pathlib.Path(__file__).parents[1] / "cuda" / "README.md"
    if not readme.exists():
        pytest.skip("cuda/README.md is not beside the tests (not a checkout of the repository)")
    rows = {}
    for line in readme.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[2]
    assert set(rows) == {*_cuda.MODULES, *_cuda.HEADERS}
    every_kernel = {name for file in _cuda.MODULES for name in _cuda.kernel_names(file)}
    for file in _cuda.MODULES:
        named = {name for code in re.findall(r"`(sr_[^`]*)`", rows[file]) for name in _expand_braces(code)}
        # Every kernel of the file, and no name that is not a kernel (a row may point to
        # another file's kernel that its op also launches).
        assert set(_cuda.kernel_names(file)) <= named <= every_kernel, file


@pytest.mark.parametrize(
    ("constant", "file", "define"),
    [
        ("SMALL_PLAN_MAX_EXPERTS", "plan.cu", "SR_SMALL_PLAN_EXPERTS"),
        ("REPLICA_SHARED_COUNTERS", "placement.cu", "REPLICA_SHARED_COUNTERS"),
        ("EXPERT_COUNT_CHUNK", "plan.cu", "SR_COUNT_CHUNK"),
        ("SCORE_SEGMENT_TOKENS", "balance.cu", "SR_SCORE_SEGMENT"),
        ("SCORE_TOTALS_BY_WARP", "balance.cu", "SR_SCORE_TOTALS_BY_WARP"),
    ],
)
def test_glue_limits_match_the_kernels_shared_arrays(constant, file, define):
    """The glue chooses a kernel (or sizes its grid) by a size the kernel also fixes: the two
    numbers are written twice (Python and CUDA) and must agree."""
    found = re.search(rf"#define {define} (\d+)", _cuda.read_source(file))
    assert found and int(found.group(1)) == getattr(_cuda_ops, constant)


# --- NVRTC -----------------------------------------------------------------------------------------


#: ptxas's resource report (``--ptxas-options=-v``): lines of information, not warnings.
PTXAS_REPORT_LINE = re.compile(r"^ptxas(\s+info\s+:|\s+\.)")
PTXAS_KERNEL = re.compile(
    r"Function properties for (\w+)\n"
    r"ptxas\s+\.\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r"ptxas info\s+: Used (\d+) registers"
)


class ReportingNvrtc:
    """An NVRTC backend that also asks ptxas for its resource report of every kernel
    (registers, stack frame, spills), keeps that report apart from the log the loader
    sees, and compiles each (source, options) once for all the tests of this file."""

    def __init__(self, backend: _cuda.Nvrtc) -> None:
        self._backend = backend
        self.name = backend.name
        self._compiled: dict[tuple, tuple] = {}

    def version(self):
        return self._backend.version()

    def supported_archs(self):
        return self._backend.supported_archs()

    def _compile(self, source, name, options, ptx):
        key = (source, name, tuple(options), ptx)
        if key not in self._compiled:
            verbose = list(options) if ptx else [*options, "--ptxas-options=-v"]
            binary, log = self._backend.compile(source, name, verbose, ptx)
            lines = log.splitlines()
            report = "\n".join(line for line in lines if PTXAS_REPORT_LINE.match(line))
            rest = "\n".join(line for line in lines if not PTXAS_REPORT_LINE.match(line))
            self._compiled[key] = (binary, rest.strip(), report)
        return self._compiled[key]

    def compile(self, source, name, options, ptx):
        binary, log, _ = self._compile(source, name, options, ptx)
        return binary, log

    def resources(self, module: _cuda.CompiledModule) -> dict[str, tuple[int, int, int, int]]:
        """kernel -> (stack frame bytes, spill store bytes, spill load bytes, registers)."""
        _, _, report = self._compile(_cuda.read_source(module.file), module.file, module.options, False)
        return {m[1]: tuple(int(g) for g in m.groups()[1:]) for m in PTXAS_KERNEL.finditer(report)}


@pytest.fixture(scope="module")
def nvrtc():
    # `make test` sets SPARSEROUTE_REQUIRE_NVRTC: there every kernel must compile, so a
    # missing NVRTC is a failure, not a skip (torch's CUDA wheels bring it).
    required = os.environ.get("SPARSEROUTE_REQUIRE_NVRTC") == "1"
    try:
        import cuda.bindings.nvrtc  # noqa: F401

        return ReportingNvrtc(_cuda.nvrtc_backend("cuda.bindings"))
    except ImportError as err:
        if required:
            raise
        pytest.skip(f"NVRTC does not load: {err}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("file", "dtype"), _cuda.module_keys(), ids=MODULE_IDS)
def test_module_compiles_without_warnings(nvrtc, file, dtype, arch):
    module = _cuda.compile_module(file, dtype, arch, nvrtc)
    assert module.log == "", module.log
    assert len(module.binary) > 0
    for kernel in _cuda.kernel_names(file):
        assert kernel.encode() in module.binary, kernel
    assert f"--gpu-architecture={arch}" in module.options and "--std=c++17" in module.options


#: The oldest and the newest architecture of NVRTC 13 (Turing's T4, consumer Blackwell): a
#: user's device may be any between them, and the loader compiles for the device's own. The
#: kernels include no CUDA headers and use no architecture-specific intrinsics, so whatever
#: compiles for these two and for ARCHS compiles for every one between.
EDGE_ARCHS = ["sm_75", "sm_120"]


#: Each source once: bfloat16 where it is specialised by dtype (its conversions from bits are
#: the most likely to differ by architecture).
EDGE_MODULES = [(file, dtype) for file, dtype in _cuda.module_keys() if dtype in (None, torch.bfloat16)]


@pytest.mark.parametrize("arch", EDGE_ARCHS)
@pytest.mark.parametrize(("file", "dtype"), EDGE_MODULES, ids=[file for file, _ in EDGE_MODULES])
def test_module_compiles_for_the_oldest_and_newest_architectures(nvrtc, file, dtype, arch):
    if int(arch.removeprefix("sm_")) not in nvrtc.supported_archs():
        pytest.skip(f"NVRTC {nvrtc.version()} does not know {arch}")
    module = _cuda.compile_module(file, dtype, arch, nvrtc)
    assert module.log == "", module.log
    for kernel in _cuda.kernel_names(file):
        assert kernel.encode() in module.binary, kernel


#: Kernels whose stack frame holds the few registers and predicates ptxas saves around its
#: calls into subroutines (a float slow path in top-k gating, here the division of each
#: key's score), not data: the most spill-store bytes each may have. The saves run only when
#: the call does.
CALL_SAVES = {
    "sr_topk_gating_warp": 16,
    "sr_topk_gating_block": 16,
    **{f"sr_topk_gating_keyed_team{m}": 32 for m in (2, 4, 8, 16)},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("file", "dtype"), _cuda.module_keys(), ids=MODULE_IDS)
def test_kernels_keep_their_data_in_registers(nvrtc, file, dtype, arch):
    """No kernel for float32, bfloat16 or float16 puts data in local memory (a stack frame,
    spills): an array whose address is taken, or indexed at run time, lands there, and each
    access is then a memory round trip, in kernels that are meant to move rows at the
    bandwidth of the device. Float64 kernels serve gradient checks, not speed: exempt."""
    module = _cuda.compile_module(file, dtype, arch, nvrtc)
    resources = nvrtc.resources(module)
    assert set(resources) == set(_cuda.kernel_names(file))
    if dtype == torch.float64:
        return
    for kernel, (stack, spill_stores, spill_loads, _registers) in resources.items():
        if kernel in CALL_SAVES:
            assert spill_stores <= CALL_SAVES[kernel] and stack <= 32, (kernel, stack, spill_stores)
        else:
            assert (stack, spill_stores, spill_loads) == (0, 0, 0), kernel


@pytest.mark.parametrize("file", ["plan.cu", "rows.cu", "tokens.cu"])
@pytest.mark.parametrize("dtype", list(_cuda.DTYPE_CODES))
def test_order_fixed_kernels_have_no_fma_and_no_flush_to_zero(nvrtc, file, dtype):
    """The combine, the gather and the dot products round every product and sum on its own,
    keeping subnormals, as the Rust kernels do: their PTX has no fma and no .ftz."""
    if _cuda.MODULES[file] == (None,):
        dtype = None
    ptx = _cuda.compile_module(file, dtype, "compute_80", nvrtc).binary.decode()
    assert ".entry" in ptx
    assert not re.search(r"\bfma\.", ptx)
    assert ".ftz" not in ptx


#: PTX loads and stores of 16 bytes: four 32-bit or two 64-bit values in one access.
WIDE_ACCESS = r"\.global(\.nc)?\.(v4\.[bfsu]32|v2\.[bfsu]64)\b"
#: The kernels that move whole rows, by source file, and the rows each reads at once (the
#: scatter reads the base row and the entry's row).
ROW_KERNELS = {
    "rows.cu": {"sr_gather_rows": 1, "sr_combine_rows": 1},
    "tokens.cu": {"sr_gather_tokens": 1, "sr_scatter_tokens": 2},
}


@pytest.mark.parametrize("file", list(ROW_KERNELS))
@pytest.mark.parametrize("dtype", list(_cuda.DTYPE_CODES))
def test_row_kernels_move_16_byte_words(nvrtc, file, dtype):
    """Each kernel that moves rows has a path that loads every row it reads and stores its
    output 16 bytes at a time (taken when the rows are aligned): what lets permute and
    unpermute run near the device's copy bandwidth. A word the compiler splits into narrower
    accesses fails this."""
    ptx = _cuda.compile_module(file, dtype, "compute_80", nvrtc).binary.decode()
    bodies = dict(re.findall(r"\.entry (\w+)\((.*?)(?=\.entry |\Z)", ptx, flags=re.DOTALL))
    for kernel, rows_read in ROW_KERNELS[file].items():
        assert len(re.findall(r"\bld" + WIDE_ACCESS, bodies[kernel])) >= rows_read, kernel
        assert re.search(r"\bst" + WIDE_ACCESS, bodies[kernel]), kernel


def test_errors_name_the_source_when_compilation_fails(nvrtc, monkeypatch):
    monkeypatch.setattr(_cuda, "read_source", lambda file: "this is not C++")
    with pytest.raises(_cuda.CudaCompileError, match=r"could not compile plan\.cu for sm_80"):
        _cuda.compile_module("plan.cu", None, "sm_80", nvrtc)


def test_device_arch_is_explicit(monkeypatch):
    class Backend:
        name = "test"

        def version(self):
            return (13, 2)

        def supported_archs(self):
            return [75, 80, 86, 90]

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert _cuda.device_arch(0, Backend()) == "sm_90"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    assert _cuda.device_arch(0, Backend()) == "compute_86"  # PTX the driver compiles for 8.9
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 0))
    with pytest.raises(_cuda.CudaCompileError, match=r"compute capability 7\.0"):
        _cuda.device_arch(0, Backend())


def test_compiled_binaries_are_cached_on_disk_by_content(nvrtc, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEROUTE_CACHE_DIR", str(tmp_path))
    name = _cuda._binary_path("plan.cu", None, "sm_80", nvrtc)
    calls = []

    def compile_binary():
        calls.append(1)
        return _cuda.compile_module("plan.cu", None, "sm_80", nvrtc).binary

    first = _cuda._stored_binary(name, compile_binary)
    second = _cuda._stored_binary(name, compile_binary)
    assert first == second == tmp_path / name and len(calls) == 1
    assert name != _cuda._binary_path("plan.cu", None, "sm_90", nvrtc)


# --- kernel arguments ------------------------------------------------------------------------------


class _CLayout(ctypes.Structure):
    """The C layout of MIXED_CODES, as a compiler lays out a kernel's parameters."""

    _fields_ = [
        ("a", ctypes.c_int32),
        ("b", ctypes.c_uint64),
        ("c", ctypes.c_int32),
        ("d", ctypes.c_float),
        ("e", ctypes.c_double),
        ("f", ctypes.c_int32),
        ("g", ctypes.c_int64),
    ]


MIXED_CODES = "iQifdiq"
MIXED_ARGUMENTS = (-7, 2**63 + 5, np.int32(2**31 - 1), 1.25, -2.5e-300, True, np.int64(-(2**40)))
MIXED_VALUES = [-7, 2**63 + 5, 2**31 - 1, 1.25, -2.5e-300, 1, -(2**40)]
CTYPES = {
    "i": ctypes.c_int32,
    "q": ctypes.c_int64,
    "Q": ctypes.c_uint64,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}


def _unpacked(address, codes):
    """The values that the pointers at ``address`` point to, read as ``codes``, and the
    pointers."""
    pointers = list((ctypes.c_void_p * len(codes)).from_address(address))
    values = [CTYPES[code].from_address(pointer).value for code, pointer in zip(codes, pointers, strict=True)]
    return values, pointers


def test_packed_arguments_sit_at_the_c_layout():
    packed = _cuda.PackedArguments("sr_test", MIXED_CODES)  # owns the memory read below
    values, pointers = _unpacked(packed.pack(MIXED_ARGUMENTS), MIXED_CODES)
    assert values == MIXED_VALUES
    offsets = [pointer - pointers[0] for pointer in pointers]
    assert offsets == [getattr(_CLayout, name).offset for name, _ in _CLayout._fields_]
    for pointer, code in zip(pointers, MIXED_CODES, strict=True):
        assert pointer % ctypes.sizeof(CTYPES[code]) == 0, "every argument is aligned to its size"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((2**31, 0, 0, 0.0, 0.0, 0, 0), "requires"),  # too large for an int
        # A negative pointer (Python 3.11 says "out of range", 3.12 "requires 0 <= number").
        ((0, -1, 0, 0.0, 0.0, 0, 0), "(range|requires 0 <= number)"),
        ((0, 0, 0, 0.0, 0.0, 0.5, 0), "integer"),  # a float for an int
        ((0, 0, 0, 0.0, 0.0, 0), "expected 7 items"),  # one argument short
    ],
)
def test_arguments_that_do_not_fit_the_parameters_are_refused(args, problem):
    packed = _cuda.PackedArguments("sr_test", MIXED_CODES)
    with pytest.raises(TypeError, match=rf"sr_test: the arguments .* do not fit its parameters .*{problem}"):
        packed.pack(args)


def test_every_kernel_has_a_signature_the_launcher_packs():
    for file in _cuda.MODULES:
        signatures = _cuda.kernel_signatures(file)
        assert signatures, file
        for kernel, codes in signatures.items():
            assert codes and set(codes) <= {"i", "q", "Q", "f", "d"}, (kernel, codes)
    # Packed arguments are kept per kernel name (packed_arguments): names are unique.
    names = [kernel for file in _cuda.MODULES for kernel in _cuda.kernel_names(file)]
    assert len(names) == len(set(names))
    # A macro parameter list is expanded (gating.cu's SR_TEAM_PARAMS).
    assert _cuda.kernel_signatures("gating.cu")["sr_topk_gating_team8"] == "QqiiiidiiQQQ"
    assert _cuda.kernel_signatures("sinkhorn.cu")["sr_sinkhorn_cost"] == "QqQQ"


def test_a_parameter_type_the_launcher_cannot_pass_is_an_error(monkeypatch):
    source = 'extern "C" __global__ void sr_odd(const float* x, unsigned char flag) {}\n'
    monkeypatch.setattr(_cuda, "read_source", lambda file: source)
    _cuda.kernel_signatures.cache_clear()
    try:
        with pytest.raises(
            _cuda.CudaCompileError, match=r"odd.cu: kernel sr_odd has a parameter 'unsigned char flag'"
        ):
            _cuda.kernel_signatures("odd.cu")
    finally:
        _cuda.kernel_signatures.cache_clear()


def test_packing_again_reuses_the_buffer_of_the_kernel():
    args = (0, 16, 0, 0)
    first = _cuda.packed_arguments("sinkhorn.cu", "sr_sinkhorn_cost", args)
    assert _cuda.packed_arguments("sinkhorn.cu", "sr_sinkhorn_cost", (0, 99, 0, 0)) == first
    assert _unpacked(first, "QqQQ")[0] == [0, 99, 0, 0]
    other = _cuda.packed_arguments("sinkhorn.cu", "sr_sinkhorn_scores", (1, 2, 3, 4, 5))
    assert other != first
    assert _unpacked(first, "QqQQ")[0] == [0, 99, 0, 0], "each kernel has a buffer of its own"


def test_each_thread_packs_into_its_own_buffer():
    args = (0, 16, 0, 0)
    here = _cuda.packed_arguments("sinkhorn.cu", "sr_sinkhorn_cost", args)
    there = []
    thread = threading.Thread(
        target=lambda: there.append(_cuda.packed_arguments("sinkhorn.cu", "sr_sinkhorn_cost", args))
    )
    thread.start()
    thread.join()
    assert there and there[0] != here


# --- the launcher, against a recording driver ----------------------------------------------------


class _RecordingDriver:
    """The three driver calls the launcher makes, recorded: which context is current, the
    switches, and each launch with the values its kernelParams held when it was made."""

    def __init__(self, current):
        self.current = current
        self.switches = []
        self.launches = []
        self.fail = False

    def ctxGetCurrent(self):  # CuPy's driver binding names these three
        return self.current

    def ctxSetCurrent(self, context):
        self.switches.append(context)
        self.current = context

    def launchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        if self.fail:
            raise RuntimeError("launch failed")
        codes = _cuda.kernel_signatures("sinkhorn.cu")["sr_sinkhorn_cost"]
        values = _unpacked(params, codes)[0]
        self.launches.append((function, (gx, gy, gz), (bx, by, bz), shared, stream, self.current, values))


DEVICE_CONTEXT = 0xC0
OTHER_CONTEXT = 0x0E


@pytest.fixture
def driver(monkeypatch):
    """The launcher of cuda:3 on a recording driver, with a fresh launcher per thread."""
    recording = _RecordingDriver(OTHER_CONTEXT)
    loads = []

    def load_module(index, file, dtype):
        loads.append((index, file, dtype))
        return _cuda.LoadedModule("sm_90", pathlib.Path(file), {"sr_sinkhorn_cost": 0xF00 + len(loads)})

    errors = torch.zeros(len(_cuda.ERROR_KINDS), dtype=torch.int32)
    monkeypatch.setattr(_cuda, "_cupy_driver", lambda: recording)
    monkeypatch.setattr(_cuda, "device_context", lambda index: DEVICE_CONTEXT)
    monkeypatch.setattr(_cuda, "error_counters", lambda index: errors)
    monkeypatch.setattr(_cuda, "load_module", load_module)
    monkeypatch.setattr(_cuda, "_current_raw_stream", lambda index: 0x5000 + index)
    monkeypatch.setattr(_cuda, "_thread_state", threading.local())
    recording.loads = loads
    recording.errors = errors
    return recording


CUDA3 = torch.device("cuda", 3)


def _cost_launch(launch, tokens):
    launch("sinkhorn.cu", torch.float32, "sr_sinkhorn_cost", 7, 128, (1, tokens, 2, launch.error_pointer))


def test_a_launch_in_a_block_runs_on_the_current_stream_in_the_device_context(driver):
    with _cuda.launcher(CUDA3) as launch:
        _cost_launch(launch, 16)
        _cost_launch(launch, 17)
        assert driver.current == DEVICE_CONTEXT
    assert driver.current == OTHER_CONTEXT, "the thread's context is restored on leaving"
    assert driver.switches == [DEVICE_CONTEXT, OTHER_CONTEXT]
    pointer = driver.errors.data_ptr()
    assert driver.launches == [
        (0xF01, (7, 1, 1), (128, 1, 1), 0, 0x5003, DEVICE_CONTEXT, [1, 16, 2, pointer]),
        (0xF01, (7, 1, 1), (128, 1, 1), 0, 0x5003, DEVICE_CONTEXT, [1, 17, 2, pointer]),
    ]
    assert driver.loads == [(3, "sinkhorn.cu", torch.float32)], "the kernel is looked up once"


def test_a_launch_outside_a_block_switches_the_context_for_itself_alone(driver):
    launch = _cuda.launcher(CUDA3)
    _cost_launch(launch, 16)
    assert driver.launches[0][4:6] == (0x5003, DEVICE_CONTEXT)
    assert driver.switches == [DEVICE_CONTEXT, OTHER_CONTEXT]
    driver.fail = True
    with pytest.raises(RuntimeError, match="launch failed"):
        _cost_launch(launch, 16)
    assert driver.current == OTHER_CONTEXT, "restored after a failed launch too"


def test_no_switch_when_the_device_context_is_current(driver):
    driver.current = DEVICE_CONTEXT
    launch = _cuda.launcher(CUDA3)
    _cost_launch(launch, 16)
    with launch:
        _cost_launch(launch, 16)
    assert len(driver.launches) == 2
    assert driver.switches == []


def test_entering_the_launcher_again_restores_the_context_at_the_outermost_exit(driver):
    with _cuda.launcher(CUDA3) as outer:
        with _cuda.launcher(CUDA3) as inner:
            assert inner is outer
            _cost_launch(inner, 16)
        assert driver.current == DEVICE_CONTEXT
        _cost_launch(outer, 16)
    assert driver.current == OTHER_CONTEXT
    assert driver.switches == [DEVICE_CONTEXT, OTHER_CONTEXT]
    assert [launch[5] for launch in driver.launches] == [DEVICE_CONTEXT, DEVICE_CONTEXT]


def test_an_empty_grid_launches_nothing(driver):
    launch = _cuda.launcher(CUDA3)
    launch("sinkhorn.cu", torch.float32, "sr_sinkhorn_cost", 0, 128, (1, 16, 2, launch.error_pointer))
    assert driver.launches == [] and driver.switches == []


def test_each_thread_has_a_launcher_of_its_own(driver):
    here = _cuda.launcher(CUDA3)
    assert _cuda.launcher(CUDA3) is here
    assert _cuda.launcher(torch.device("cuda", 2)) is not here
    there = []
    thread = threading.Thread(target=lambda: there.append(_cuda.launcher(CUDA3)))
    thread.start()
    thread.join()
    assert there and there[0] is not here
    assert here.error_pointer == driver.errors.data_ptr()


# --- errors without CuPy or without a GPU ---------------------------------------------------------


def test_cuda_tensors_without_cupy_say_what_to_install(monkeypatch):
    monkeypatch.setattr(_cuda, "_CUPY_FOUND", False)
    with FakeTensorMode():
        logits = torch.empty(4, 8, device="cuda")
        x = torch.empty(4, 16, device="cuda")
        with pytest.raises(
            ImportError, match=r"logits: got a CUDA tensor.*sparseroute\[gpu\].*cupy-cuda1[23]x"
        ):
            sparseroute.topk_gating(logits, 2)
        with pytest.raises(ImportError, match=r"x: got a CUDA tensor"):
            sparseroute.permute(x, torch.zeros(4, 2, dtype=torch.int64, device="cuda"), 8)


def test_cuda_tensors_pass_the_checks_when_cupy_is_installed(monkeypatch):
    """With CuPy, the public wrappers accept CUDA tensors (here fake ones, which run the ops'
    fake kernels: shapes, dtypes and devices as on the GPU)."""
    monkeypatch.setattr(_cuda, "_CUPY_FOUND", True)
    with FakeTensorMode():
        logits = torch.empty(6, 8, device="cuda")
        weights, experts = sparseroute.topk_gating(logits, 2, expert_bias=torch.zeros(8, device="cuda"))
        assert weights.device.type == experts.device.type == "cuda"
        assert weights.dtype == torch.float32 and experts.dtype == torch.int64
        x_sorted, plan = sparseroute.permute(torch.empty(6, 16, device="cuda"), experts, 8, num_rows=12)
        assert x_sorted.shape == (12, 16) and plan.slot_to_row.shape == (6, 2)
        y = sparseroute.unpermute(x_sorted, plan, weights)
        assert y.shape == (6, 16) and y.device.type == "cuda"


def test_other_devices_keep_the_cpu_error():
    with pytest.raises(ValueError, match="logits: expected a CPU tensor"):
        sparseroute.topk_gating(torch.empty(4, 8, device="meta"), 2)


def test_launching_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"need CuPy: install sparseroute's GPU extra"):
        _cuda.cupy_module()


def test_every_op_has_a_cuda_kernel_or_a_clear_error():
    # register() runs when sparseroute is imported; ops of modules imported later (lazily)
    # get their stand-ins when it runs again. It is idempotent.
    _cuda_ops.register()
    names = _cuda_ops._sparseroute_ops()
    assert {f"sparseroute::{name}" for name in _cuda_ops.CUDA_OPS} <= set(names)
    for name in names:
        assert _cuda_ops._has_cuda_kernel(name), name
    stand_in = _cuda_ops._missing_kernel("sparseroute::topp_gating")
    with pytest.raises(
        NotImplementedError, match=r"sparseroute::topp_gating has no CUDA kernel.*tensor\.cpu"
    ):
        stand_in(torch.empty(1))


def test_check_cuda_errors_without_a_device_is_a_no_op():
    sparseroute.check_cuda_errors()


# --- info ------------------------------------------------------------------------------------------


def test_info_describes_the_installation():
    info = sparseroute.info()
    assert info["version"] == sparseroute.__version__
    assert info["rust_threads"] == sparseroute.get_num_threads()
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["cuda_ops"] == list(_cuda_ops.CUDA_OPS)
    assert set(info["cuda_source_files"]) >= {"gating.cu", "plan.cu", "rows.cu", "tokens.cu", "common.cuh"}
    assert {"cupy", "nvrtc", "device", "torch_cuda"} <= set(info)


def test_python_m_sparseroute_info():
    result = subprocess.run(
        [sys.executable, "-m", "sparseroute", "info"], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.startswith("version:")
    for key in ("rust_threads:", "cuda_available:", "cupy:", "nvrtc:", "device:", "cuda_ops:"):
        assert key in result.stdout

"""The CUDA backend: finding, compiling, caching and launching the kernels of sparseroute/cuda.

The CUDA C++ sources ship inside the wheel (``sparseroute/cuda/*.cu``, found through
``importlib.resources``). A module is compiled by NVRTC for the exact architecture of the
device (``sm_XY`` from its compute capability; PTX for the newest architecture NVRTC knows when
the device is newer still), once per (device, source file, element type), and loaded through
the CUDA driver (CuPy's binding of ``cuModuleLoad``). Compiled binaries are also kept on disk,
named by a hash of the sources, the options and the NVRTC version (``$SPARSEROUTE_CACHE_DIR``,
default ``~/.cache/sparseroute/cuda``), so a new process skips the compile.

NVRTC is called directly (through ``cuda.bindings.nvrtc`` when cuda-python is installed, as
with torch's CUDA 13 wheels, else through CuPy's own NVRTC binding) rather than through
``cupy.RawModule(code=...)``, because CuPy compiles its modules with ``-ftz=true``:
flushing subnormal floats to zero would break the bit-for-bit agreement of the combine and
the dot products with the CPU kernels. The options are ``compile_options``; the tests compile
every module with them for sm_80 and sm_90.

Launches go on torch's current stream of the tensor's device (its raw pointer, passed with
each launch), with that device current. Tensors cross as raw pointers
(``tensor.data_ptr()``), scalars as numbers; torch allocates every output and workspace, CuPy
allocates nothing. The launcher packs the arguments into a per-thread buffer at the widths and
C layout of the kernel's own declaration in its source (``kernel_signatures``,
``PackedArguments``), so no argument can be passed at a width the kernel does not read, and
launches the kernel with ``cuLaunchKernel`` itself: a CuPy ``RawKernel`` call converts each
argument to an object of its own first, which made it most of the host time of a small op.

Kernels never synchronise with the host. Invalid inputs that the CPU kernels refuse with an
exception (NaN logits, expert ids out of range, corrupt plans) are counted instead in a small
torch-allocated int32 buffer per device, which ``check_errors`` (public as
``sparseroute.check_cuda_errors``) reads, clears and turns into ``InvalidInputError``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import importlib.resources
import importlib.util
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

CUPY_INSTALL_HINT = (
    "install sparseroute's GPU extra: pip install 'sparseroute[gpu]' "
    "(or CuPy itself: pip install cupy-cuda12x, or cupy-cuda13x, matching your CUDA version)"
)

# Looked up once at import (without importing CuPy, which is slow): argument checks read this
# flag, and they run inside torch.compile's tracing, where imports cannot happen.
_CUPY_FOUND = importlib.util.find_spec("cupy") is not None

#: The element types of the kernels and the code each module is compiled with (-DSR_DTYPE).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}

#: The source files of the kernels and the element types each is compiled for (None: the
#: module does not depend on one).
MODULES: dict[str, tuple[torch.dtype | None, ...]] = {
    "balance.cu": tuple(DTYPE_CODES),
    "expert_choice.cu": tuple(DTYPE_CODES),
    "gating.cu": tuple(DTYPE_CODES),
    "layers.cu": tuple(DTYPE_CODES),
    "placement.cu": (None,),
    "plan.cu": (None,),
    "rows.cu": tuple(DTYPE_CODES),
    "sinkhorn.cu": (None,),
    "tokens.cu": tuple(DTYPE_CODES),
    "topp.cu": tuple(DTYPE_CODES),
}

#: Headers the sources include.
HEADERS = ("common.cuh",)

#: Slots of the per-device error buffer (the SR_ERR_* constants of common.cuh).
ERROR_KINDS = (
    "rows of logits holding NaN or an infinity (topk_gating routed them nowhere: experts -1, weights 0; "
    "score_sums, score_sums_backward and z_loss skipped them; layer_plan, for NaN: decision -1)",
    "expert ids outside [-1, num_experts) (treated as empty slots)",
    "plan indices outside the tensors (treated as empty rows or slots)",
    "slots that did not fit in num_rows rows (permute left them unrouted: slot_to_row -1)",
    "token indices outside [-1, S) or repeated within a sequence (gather_tokens, scatter_tokens and "
    "token_dots treated them as -1)",
    "sequences with a NaN score at a valid position or a length outside [0, S] (select_tokens kept "
    "nothing: indices -1, mask False)",
    "NaN drop weights of capacity dispatch with drop_policy='probs' (ranked above every number)",
    "sinkhorn logits that are NaN, -inf or above 88 (their cost exp(logit) was taken as 0)",
)

# A kernel's declaration: its name and its parameter list (written out, or one macro).
_KERNEL_DECLARATION = re.compile(
    r'extern "C" __global__ void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(([^)]*)\)'
)
# An object-like macro (no parameters), with its continued lines.
_MACRO = re.compile(r"^#define[ \t]+(\w+)[ \t]+((?:.*\\\n)*.*)$", re.MULTILINE)
#: The ``struct`` code of each scalar parameter type of the kernels (common.cuh's typedefs);
#: every pointer is a "Q". Native mode ("@") lays the codes out with C's sizes and alignments,
#: which is how CUDA lays out a kernel's parameters.
PARAMETER_CODES: dict[str, str] = {"int": "i", "i64": "q", "u64": "Q", "float": "f", "double": "d"}


class CudaCompileError(RuntimeError):
    """NVRTC could not compile one of sparseroute's CUDA modules."""


def check_available(name: str) -> None:
    """Raises a clear ImportError, naming the argument, when a CUDA tensor reaches an op
    but CuPy, which launches the CUDA kernels, is not installed."""
    if not _CUPY_FOUND:
        raise ImportError(
            f"{name}: got a CUDA tensor, and sparseroute's CUDA kernels need CuPy, which is not "
            f"installed; {CUPY_INSTALL_HINT}"
        )


@functools.cache
def _cupy_driver() -> Any:
    """CuPy's binding of the CUDA driver API (looked up once: the launcher needs it per op)."""
    return cupy_module().cuda.driver


def cupy_module() -> Any:
    """CuPy, imported on first use, or an ImportError saying what to install."""
    try:
        return importlib.import_module("cupy")
    except ImportError as err:
        raise ImportError(f"sparseroute's CUDA kernels need CuPy: {CUPY_INSTALL_HINT} ({err})") from err


# --- sources ---------------------------------------------------------------------------------


def kernel_dir() -> Path:
    """The directory of the CUDA sources inside the installed package."""
    return Path(str(importlib.resources.files("sparseroute") / "cuda"))


def read_source(file: str) -> str:
    return (kernel_dir() / file).read_text(encoding="utf-8")


@functools.cache
def kernel_signatures(file: str) -> dict[str, str]:
    """The ``extern "C"`` kernels a source file defines, each with its parameters as
    ``struct`` codes (see PARAMETER_CODES): the launcher packs the arguments by them."""
    source = read_source(file)
    macros = {name: body.replace("\\\n", " ") for name, body in _MACRO.findall(source)}
    signatures = {}
    for kernel, parameters in _KERNEL_DECLARATION.findall(source):
        parameters = macros.get(parameters.strip(), parameters)
        codes = []
        for parameter in parameters.split(","):
            declaration = " ".join(parameter.split())
            kind = declaration.rsplit(" ", 1)[0].removeprefix("const ")
            code = "Q" if "*" in declaration else PARAMETER_CODES.get(kind)
            if code is None:
                raise CudaCompileError(
                    f"{file}: kernel {kernel} has a parameter '{declaration}' of a type the launcher "
                    f"cannot pass (pointers and {', '.join(PARAMETER_CODES)})"
                )
            codes.append(code)
        signatures[kernel] = "".join(codes)
    return signatures


def kernel_names(file: str) -> tuple[str, ...]:
    """The ``extern "C"`` kernels a source file defines."""
    return tuple(kernel_signatures(file))


def module_keys() -> list[tuple[str, torch.dtype | None]]:
    """Every (source file, element type) the loader compiles for a device."""
    return [(file, dtype) for file, dtypes in MODULES.items() for dtype in dtypes]


def compile_options(arch: str, dtype: torch.dtype | None) -> list[str]:
    """NVRTC options of a module: C++17, the explicit architecture (``sm_XY`` gives a cubin,
    ``compute_XY`` PTX), IEEE arithmetic without contraction or flush-to-zero, the element
    type."""
    options = [
        "--std=c++17",
        f"--gpu-architecture={arch}",
        "--fmad=false",
        "--ftz=false",
        "--prec-div=true",
        "--prec-sqrt=true",
        f"--include-path={kernel_dir()}",
    ]
    if dtype is not None:
        options.append(f"-DSR_DTYPE={DTYPE_CODES[dtype]}")
    return options


# --- NVRTC -----------------------------------------------------------------------------------


class Nvrtc(Protocol):
    """The NVRTC calls the loader needs, from one Python binding or another."""

    name: str

    def version(self) -> tuple[int, int]: ...

    def supported_archs(self) -> list[int]: ...

    def compile(self, source: str, name: str, options: Sequence[str], ptx: bool) -> tuple[bytes | None, str]:
        """(cubin or PTX, log); the binary is None when compilation failed."""
        ...


class _CudaBindingsNvrtc:
    """NVRTC through cuda-python (``cuda.bindings.nvrtc``)."""

    name = "cuda.bindings"

    def __init__(self) -> None:
        nvrtc: Any = importlib.import_module("cuda.bindings.nvrtc")
        self._nvrtc = nvrtc
        self._success = nvrtc.nvrtcResult.NVRTC_SUCCESS
        self.version()  # loads libnvrtc, or raises

    def _check(self, result: Any, what: str) -> None:
        if result != self._success:
            raise CudaCompileError(f"NVRTC {what} failed: {result}")

    def version(self) -> tuple[int, int]:
        result, major, minor = self._nvrtc.nvrtcVersion()
        self._check(result, "nvrtcVersion")
        return int(major), int(minor)

    def supported_archs(self) -> list[int]:
        result, archs = self._nvrtc.nvrtcGetSupportedArchs()
        self._check(result, "nvrtcGetSupportedArchs")
        return [int(a) for a in archs]

    def compile(self, source: str, name: str, options: Sequence[str], ptx: bool) -> tuple[bytes | None, str]:
        nv = self._nvrtc
        result, program = nv.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
        self._check(result, "nvrtcCreateProgram")
        try:
            encoded = [option.encode() for option in options]
            (compiled,) = nv.nvrtcCompileProgram(program, len(encoded), encoded)
            result, size = nv.nvrtcGetProgramLogSize(program)
            self._check(result, "nvrtcGetProgramLogSize")
            log = b" " * size
            (result,) = nv.nvrtcGetProgramLog(program, log)
            self._check(result, "nvrtcGetProgramLog")
            text = log.rstrip(b"\x00").decode(errors="replace").strip()
            if compiled != self._success:
                return None, text
            get_size, get = (
                (nv.nvrtcGetPTXSize, nv.nvrtcGetPTX) if ptx else (nv.nvrtcGetCUBINSize, nv.nvrtcGetCUBIN)
            )
            result, size = get_size(program)
            self._check(result, "getting the binary's size")
            binary = b" " * size
            (result,) = get(program, binary)
            self._check(result, "getting the binary")
            return bytes(binary), text
        finally:
            nv.nvrtcDestroyProgram(program)


class _CupyNvrtc:
    """NVRTC through CuPy's binding (``cupy_backends.cuda.libs.nvrtc``)."""

    name = "cupy"

    def __init__(self) -> None:
        cupy_module()
        self._nvrtc: Any = importlib.import_module("cupy_backends.cuda.libs.nvrtc")

    def version(self) -> tuple[int, int]:
        major, minor = self._nvrtc.getVersion()
        return int(major), int(minor)

    def supported_archs(self) -> list[int]:
        supported = getattr(self._nvrtc, "getSupportedArchs", None)  # CuPy >= 12
        return [] if supported is None else [int(a) for a in supported()]

    def compile(self, source: str, name: str, options: Sequence[str], ptx: bool) -> tuple[bytes | None, str]:
        nv = self._nvrtc
        program = nv.createProgram(source, name, (), ())
        try:
            try:
                nv.compileProgram(program, list(options))
            except nv.NVRTCError:
                return None, str(nv.getProgramLog(program)).rstrip("\x00").strip()
            log = str(nv.getProgramLog(program)).rstrip("\x00").strip()
            return bytes(nv.getPTX(program) if ptx else nv.getCUBIN(program)), log
        finally:
            nv.destroyProgram(program)


_BACKENDS: dict[str, Any] = {"cuda.bindings": _CudaBindingsNvrtc, "cupy": _CupyNvrtc}
_backend_cache: dict[str, Nvrtc] = {}


def nvrtc_backend(name: str | None = None) -> Nvrtc:
    """The NVRTC binding the loader uses: ``name`` ("cuda.bindings" or "cupy"), or the first
    of them that loads."""
    names = [name] if name is not None else list(_BACKENDS)
    errors = []
    for candidate in names:
        if candidate in _backend_cache:
            return _backend_cache[candidate]
        if candidate not in _BACKENDS:
            raise ValueError(f"name: expected one of {sorted(_BACKENDS)}, got {candidate!r}")
        try:
            backend: Nvrtc = _BACKENDS[candidate]()
        except Exception as err:  # a missing package or a libnvrtc that does not load
            errors.append(f"{candidate}: {err}")
            continue
        _backend_cache[candidate] = backend
        return backend
    raise ImportError(f"no NVRTC found to compile sparseroute's CUDA kernels ({'; '.join(errors)})")


@dataclass(frozen=True)
class CompiledModule:
    """One compiled module: the binary (a cubin, or PTX), NVRTC's log and the options."""

    file: str
    dtype: torch.dtype | None
    arch: str
    binary: bytes
    log: str
    options: tuple[str, ...]

    @property
    def is_ptx(self) -> bool:
        return self.arch.startswith("compute_")


def compile_module(
    file: str, dtype: torch.dtype | None, arch: str, backend: Nvrtc | None = None
) -> CompiledModule:
    """Compiles one source file for one element type and architecture (``sm_XY`` or
    ``compute_XY``). Raises CudaCompileError with NVRTC's log on failure."""
    backend = backend or nvrtc_backend()
    options = compile_options(arch, dtype)
    binary, log = backend.compile(read_source(file), file, options, ptx=arch.startswith("compute_"))
    if binary is None:
        raise CudaCompileError(
            f"NVRTC ({backend.name} {'.'.join(map(str, backend.version()))}) could not compile "
            f"{file} for {arch}, dtype {dtype}:\n{log}"
        )
    return CompiledModule(file, dtype, arch, binary, log, tuple(options))


def device_arch(index: int, backend: Nvrtc) -> str:
    """The NVRTC architecture for device ``index``: ``sm_XY`` for its compute capability when
    NVRTC supports it, else PTX for the newest older architecture NVRTC knows (the driver
    compiles that PTX for the device)."""
    major, minor = torch.cuda.get_device_capability(index)
    capability = major * 10 + minor
    supported = backend.supported_archs()
    if capability in supported or not supported:  # no list: trust the device's own
        return f"sm_{capability}"
    older = [a for a in supported if a <= capability]
    if not older:
        raise CudaCompileError(
            f"NVRTC {'.'.join(map(str, backend.version()))} cannot compile for compute capability "
            f"{major}.{minor} (it supports {supported})"
        )
    return f"compute_{max(older)}"


# --- the module cache --------------------------------------------------------------------------


def _disk_cache_dir() -> Path:
    configured = os.environ.get("SPARSEROUTE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparseroute" / "cuda"


_fallback_dir: Path | None = None


def _binary_path(file: str, dtype: torch.dtype | None, arch: str, backend: Nvrtc) -> Path:
    """A content-addressed file for the compiled module: its name hashes everything that
    determines the binary, so an existing file is always the right one."""
    digest = hashlib.sha256()
    for part in [backend.name, str(backend.version()), *compile_options(arch, dtype)]:
        digest.update(part.encode() + b"\0")
    for source in (file, *HEADERS):
        digest.update(read_source(source).encode() + b"\0")
    dtype_name = "any" if dtype is None else str(dtype).removeprefix("torch.")
    suffix = "ptx" if arch.startswith("compute_") else "cubin"
    return Path(f"{Path(file).stem}-{dtype_name}-{arch}-{digest.hexdigest()[:20]}.{suffix}")


def _stored_binary(name: Path, compile_binary: Callable[[], bytes]) -> Path:
    """The path of the binary ``name`` in the disk cache, compiling and writing it first when
    it is not there (written to a temporary file, then renamed: never half-written). Falls
    back to a per-process temporary directory when the cache directory is not writable."""
    global _fallback_dir
    directories = [_disk_cache_dir()] + ([_fallback_dir] if _fallback_dir is not None else [])
    for directory in directories:
        path = directory / name
        if path.is_file() and path.stat().st_size > 0:
            return path
    binary = compile_binary()
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            with os.fdopen(fd, "wb") as out:
                out.write(binary)
            os.replace(temporary, directory / name)
            return directory / name
        except OSError:
            continue
    _fallback_dir = Path(tempfile.mkdtemp(prefix="sparseroute-cuda-"))
    (_fallback_dir / name).write_bytes(binary)
    return _fallback_dir / name


@dataclass
class LoadedModule:
    arch: str
    path: Path
    #: The ``CUfunction`` handle of each kernel of the module.
    functions: dict[str, int]


_lock = threading.Lock()
_modules: dict[tuple[int, str, torch.dtype | None], LoadedModule] = {}
_error_buffers: dict[int, torch.Tensor] = {}
_contexts: dict[int, int] = {}


def _capturing() -> bool:
    return bool(torch.cuda.is_current_stream_capturing())


def _not_during_capture(what: str) -> None:
    if _capturing():
        raise RuntimeError(
            f"sparseroute: {what} is not ready and cannot be prepared while a CUDA graph is being "
            "captured; call sparseroute.warm_up_cuda() (or run the ops once) before capturing"
        )


def device_context(index: int) -> int:
    """The CUDA context of device ``index``: its primary context, the one torch uses. Modules
    are loaded into it, and the launcher makes it current around its launches."""
    context = _contexts.get(index)
    if context is None:
        cupy = cupy_module()
        with cupy.cuda.Device(index):
            # cudaFree(0): the usual no-op that initialises the current device's primary
            # context and binds it to this thread (selecting the device does not always).
            cupy.cuda.runtime.free(0)
            context = int(_cupy_driver().ctxGetCurrent())
        _contexts[index] = context
    return context


@contextmanager
def _context_current(index: int) -> Iterator[None]:
    """Within the block, the context of device ``index`` is current in this thread."""
    driver = _cupy_driver()
    context = device_context(index)
    previous = driver.ctxGetCurrent()
    if previous != context:
        driver.ctxSetCurrent(context)
    try:
        yield
    finally:
        if previous != context:
            driver.ctxSetCurrent(previous)


def load_module(index: int, file: str, dtype: torch.dtype | None) -> LoadedModule:
    """The module of ``file`` for element type ``dtype`` on device ``index``, compiled and
    loaded on first use (never during CUDA graph capture)."""
    key = (index, file, dtype)
    module = _modules.get(key)
    if module is not None:
        return module
    with _lock:
        module = _modules.get(key)
        if module is not None:
            return module
        _not_during_capture(f"the CUDA module {file} ({dtype}) for cuda:{index}")
        driver = _cupy_driver()  # first: without CuPy, the error says what to install
        backend = nvrtc_backend()
        arch = device_arch(index, backend)
        name = _binary_path(file, dtype, arch, backend)
        path = _stored_binary(name, lambda: compile_module(file, dtype, arch, backend).binary)
        with _context_current(index):
            # Loaded for the life of the process, like the device's context.
            handle = driver.moduleLoad(str(path))
            functions = {kernel: driver.moduleGetFunction(handle, kernel) for kernel in kernel_names(file)}
        module = LoadedModule(arch, path, functions)
        _modules[key] = module
        return module


def error_counters(index: int) -> torch.Tensor:
    """The int32 error buffer of device ``index`` (one counter per ``ERROR_KINDS`` entry)."""
    buffer = _error_buffers.get(index)
    if buffer is None:
        with _lock:
            buffer = _error_buffers.get(index)
            if buffer is None:
                _not_during_capture(f"the error buffer of cuda:{index}")
                buffer = torch.zeros(len(ERROR_KINDS), dtype=torch.int32, device=f"cuda:{index}")
                _error_buffers[index] = buffer
    return buffer


def _device_index(device: torch.device | int | str | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def warm_up(device: torch.device | int | str | None = None) -> list[str]:
    """Compiles and loads every CUDA module of sparseroute for ``device`` (default: the
    current device) and allocates its error buffer, so that no op compiles or allocates
    later: call it before capturing a CUDA graph. Returns the modules, as
    ``"file (dtype) -> arch"`` strings."""
    index = _device_index(device)
    loaded = []
    for file, dtype in module_keys():
        module = load_module(index, file, dtype)
        loaded.append(
            f"{file} ({'any' if dtype is None else str(dtype).removeprefix('torch.')}) -> {module.arch}"
        )
    error_counters(index)
    return loaded


def check_errors(device: torch.device | int | str | None = None) -> None:
    """Reads and clears the error counters of ``device`` (default: the current device), and
    raises ``sparseroute.InvalidInputError`` if a CUDA kernel met invalid input since the last
    check. This waits for the whole device; the ops themselves never do."""
    from sparseroute._core import InvalidInputError

    if not torch.cuda.is_available():
        return
    index = _device_index(device)
    buffer = _error_buffers.get(index)
    if buffer is None:
        return
    torch.cuda.synchronize(index)  # kernels on every stream of the device have counted
    counts = buffer.tolist()
    buffer.zero_()
    found = [f"{count} {kind}" for count, kind in zip(counts, ERROR_KINDS, strict=True) if count]
    if found:
        raise InvalidInputError(
            f"sparseroute CUDA kernels on cuda:{index} met invalid input since the last check: "
            + "; ".join(found)
        )


def cached_modules() -> list[tuple[int, str, torch.dtype | None, str]]:
    """(device, file, dtype, arch) of every loaded module."""
    return [(index, file, dtype, module.arch) for (index, file, dtype), module in _modules.items()]


# --- launching -------------------------------------------------------------------------------


def pointer(tensor: torch.Tensor | None) -> int:
    """A kernel argument for a tensor's data (a null pointer for None)."""
    return 0 if tensor is None else tensor.data_ptr()


# torch's current stream of a device as a raw pointer. The public route builds a
# torch.cuda.Stream object on every call, a few microseconds of a small op's host time.
_current_raw_stream: Callable[[int], int] = getattr(
    torch._C, "_cuda_getCurrentRawStream", lambda index: torch.cuda.current_stream(index).cuda_stream
)


class PackedArguments:
    """Kernel arguments in the form ``cuLaunchKernel`` takes them (``kernelParams``): an array
    of pointers, one per parameter, into a buffer that holds the values at the kernel's C
    layout.

    The widths come from the kernel's declaration (``kernel_signatures``), so an argument
    is never passed at a width the kernel does not read: tensors go as their ``data_ptr()``,
    scalars as Python or numpy numbers, and a value that does not fit its parameter (an int
    above 2**31 - 1 for an ``int``, a float for an integer) raises. One object serves every
    launch of its kernel in one thread (see ``packed_arguments``): ``pack`` rewrites the values
    in place and returns the array's address; the driver copies the values when it launches
    the kernel, so the buffer can be reused at once."""

    __slots__ = ("_layout", "_pointers", "_values", "address", "kernel")

    def __init__(self, kernel: str, codes: str) -> None:
        self.kernel = kernel
        self._layout = struct.Struct("@" + codes)
        # Stored as 8-byte words: aligned for the widest parameter.
        self._values = (ctypes.c_uint64 * max(1, -(-self._layout.size // 8)))()
        base = ctypes.addressof(self._values)
        # Each parameter starts where a struct of the parameters before it, padded for its
        # own alignment, ends.
        offsets = [
            struct.calcsize("@" + codes[: position + 1]) - struct.calcsize("@" + code)
            for position, code in enumerate(codes)
        ]
        self._pointers = (ctypes.c_void_p * max(1, len(codes)))(*(base + offset for offset in offsets))
        self.address = ctypes.addressof(self._pointers)

    def pack(self, args: Sequence[Any]) -> int:
        """Writes ``args`` into the buffer; returns the address of the pointer array."""
        try:
            self._layout.pack_into(self._values, 0, *args)
        except struct.error as err:
            raise TypeError(
                f"{self.kernel}: the arguments {tuple(args)} do not fit its parameters "
                f"(struct codes '{self._layout.format[1:]}'): {err}"
            ) from None
        return self.address


_thread_state = threading.local()


def _packer(file: str, kernel: str) -> PackedArguments:
    """This thread's ``PackedArguments`` of ``kernel`` (of source ``file``)."""
    try:
        cache: dict[str, PackedArguments] = _thread_state.arguments
    except AttributeError:
        cache = _thread_state.arguments = {}
    packed = cache.get(kernel)
    if packed is None:
        packed = cache[kernel] = PackedArguments(kernel, kernel_signatures(file)[kernel])
    return packed


def packed_arguments(file: str, kernel: str, args: Sequence[Any]) -> int:
    """``args`` of ``kernel`` (of source ``file``) packed for ``cuLaunchKernel``: the address
    of its ``kernelParams`` array, valid until this thread packs arguments for ``kernel``
    again."""
    return _packer(file, kernel).pack(args)


class Launcher:
    """Launches kernels on one device, on torch's current stream there, with the device's
    context current in this thread (a thread that has not used CUDA has none, whatever its
    current device). ``launch(...)`` alone reads the stream and makes the context current for
    that launch; an op of several launches shares one ``with launcher(device) as launch:``
    block, which does both once on entering and restores the thread's context on leaving (the
    outermost exit, when blocks nest).

    There is one launcher per (thread, device) (see ``launcher``): it keeps each kernel's
    function handle and packed-argument buffer, so that a launch costs one dictionary lookup
    besides packing the arguments and the driver call (a small op's host time is mostly such
    work: ``benches/gpu_overhead.py``)."""

    __slots__ = (
        "_context",
        "_depth",
        "_driver",
        "_kernels",
        "_launch",
        "_restore",
        "_stream",
        "error_pointer",
        "errors",
        "index",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        #: The device's error counters (see ``error_counters``) and their address, which
        #: the kernels take as their last argument.
        self.errors = error_counters(index)
        self.error_pointer = self.errors.data_ptr()
        self._driver = _cupy_driver()
        self._launch = self._driver.launchKernel
        self._context = device_context(index)
        self._stream = 0
        self._depth = 0
        self._restore: int | None = None
        self._kernels: dict[tuple[str, torch.dtype | None, str], tuple[Any, PackedArguments]] = {}

    def _make_current(self) -> int | None:
        """Makes the device's context current in this thread; returns the context to restore
        afterwards, None when it already was current."""
        current = self._driver.ctxGetCurrent()
        if current == self._context:
            return None
        self._driver.ctxSetCurrent(self._context)
        return int(current)

    def __enter__(self) -> Launcher:
        self._stream = _current_raw_stream(self.index)
        if self._depth == 0:
            self._restore = self._make_current()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._restore is not None:
            restore, self._restore = self._restore, None
            self._driver.ctxSetCurrent(restore)

    def __call__(
        self,
        file: str,
        dtype: torch.dtype | None,
        kernel: str,
        grid: int,
        block: int,
        args: Sequence[Any],
        shared_mem: int = 0,
    ) -> None:
        """Launches ``kernel`` (of module ``file`` for ``dtype``) on ``grid`` blocks of
        ``block`` threads with ``args``. Outside a ``with`` block, the launch reads the
        current stream and makes the context current for itself alone: an op of one launch
        needs no block."""
        if grid <= 0:
            return
        found = self._kernels.get((file, dtype, kernel))
        if found is None:
            function = load_module(self.index, file, dtype).functions[kernel]
            found = self._kernels[file, dtype, kernel] = (function, _packer(file, kernel))
        function, packer = found
        params = packer.pack(args)
        if self._depth:
            stream, restore = self._stream, None
        else:
            stream, restore = _current_raw_stream(self.index), self._make_current()
        try:
            self._launch(function, grid, 1, 1, block, 1, 1, shared_mem, stream, params, 0)
        finally:
            if restore is not None:
                self._driver.ctxSetCurrent(restore)


def launcher(device: torch.device) -> Launcher:
    """This thread's ``Launcher`` for ``device`` (a context manager; see ``Launcher``)."""
    # A tensor's device names its index: no need to build another device object.
    index = device.index if device.type == "cuda" and device.index is not None else None
    if index is None:
        index = _device_index(device)
    try:
        return _thread_state.launchers[index]  # type: ignore[no-any-return]
    except AttributeError:
        _thread_state.launchers = {}
    except KeyError:
        pass
    made = _thread_state.launchers[index] = Launcher(index)
    return made

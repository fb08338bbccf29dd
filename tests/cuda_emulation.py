"""Run sparseroute's CUDA kernels on the CPU: the kernel sources of the installed package,
compiled by the host C++ compiler against cuda_emulation.h, launched by the ops' own CUDA
glue (sparseroute._cuda_ops) with CPU tensors in place of CUDA tensors.

``emulated_launcher`` replaces ``sparseroute._cuda.launcher``: kernels receive the same
arguments (raw pointers and numbers, packed by ``sparseroute._cuda.packed_arguments`` at the
widths of the kernel's declaration into the ``kernelParams`` array that cuLaunchKernel takes)
and the same grid and block sizes as on a GPU. Arguments in the wrong order or of the wrong
kind would be read as garbage here exactly as on the device.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseroute import _cuda, _cuda_ops

HEADER = pathlib.Path(__file__).with_name("cuda_emulation.h")
#: ``SPARSEROUTE_EMULATION_SANITIZER=thread`` builds the kernels with ThreadSanitizer (the
#: process must then preload libtsan: see test_cuda_races.py), which reports any access to
#: shared or global memory that races with another thread's between two barriers;
#: ``address,undefined,float-cast-overflow`` with AddressSanitizer and UBSan (preloading
#: libasan: see test_cuda_memory.py), which report any access outside a tensor or an array,
#: any 16-byte word at an address that is not a multiple of 16, and any operation C++ leaves
#: undefined (shifts past the width, signed overflow, float-to-integer overflow).
SANITIZER = os.environ.get("SPARSEROUTE_EMULATION_SANITIZER", "")
_lock = threading.Lock()
_libraries: dict[tuple[str, torch.dtype | None], ctypes.CDLL] = {}


def compiler() -> str | None:
    return shutil.which("g++")


def _build(file: str, dtype: torch.dtype | None) -> ctypes.CDLL:
    kernel_dir = _cuda.kernel_dir()
    names = _cuda.kernel_names(file)
    table = "\n".join(
        f'  if (std::strcmp(name, "{n}") == 0) return sr_emulation::run(&{n}, grid, block, args);'
        for n in names
    )
    source = (
        f'#include "{file}"\n'
        'extern "C" int sr_emulated_launch(const char* name, unsigned grid, unsigned block, void** args) {\n'
        f"{table}\n  return -1;\n}}\n"
    )
    defines = [] if dtype is None else [f"-DSR_DTYPE={_cuda.DTYPE_CODES[dtype]}"]
    if SANITIZER:
        # Any report ends the process (the sanitizer options name the log file).
        defines += [f"-fsanitize={SANITIZER}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    digest = hashlib.sha256(source.encode())
    for path in [HEADER, *(kernel_dir / name for name in (file, *_cuda.HEADERS))]:
        digest.update(path.read_bytes())
    digest.update(" ".join(defines).encode())
    out_dir = pathlib.Path(tempfile.gettempdir()) / "sparseroute-cuda-emulation"
    out_dir.mkdir(exist_ok=True)
    library = out_dir / f"{pathlib.Path(file).stem}-{digest.hexdigest()[:20]}.so"
    if not library.exists():
        with tempfile.TemporaryDirectory() as work:
            cpp = pathlib.Path(work) / "module.cpp"
            cpp.write_text(source)
            partial = pathlib.Path(work) / "module.so"
            command = [
                compiler() or "g++",
                "-std=c++20",
                "-O1",
                "-ffp-contract=off",
                "-fPIC",
                "-shared",
                "-pthread",
                "-Wall",
                "-Wno-unknown-pragmas",
                "-include",
                str(HEADER),
                f"-I{kernel_dir}",
                *defines,
                str(cpp),
                "-o",
                str(partial),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"emulation build of {file} failed:\n{result.stderr}")
            shutil.move(str(partial), library)
    lib = ctypes.CDLL(str(library))
    lib.sr_emulated_launch.restype = ctypes.c_int
    lib.sr_emulated_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
    return lib


def library(file: str, dtype: torch.dtype | None) -> ctypes.CDLL:
    with _lock:
        key = (file, dtype)
        if key not in _libraries:
            _libraries[key] = _build(file, dtype)
        return _libraries[key]


#: The test running now (its node id from the tests folder), set by conftest.py; while it is
#: set, each launch is recorded in ``launches_by_test``.
current_test: str | None = None


@dataclass
class LaunchRecord:
    """What one test launched: each kind of launch once, and the host threads of them all."""

    #: (kernel, dtype, threads per block, more than one block, the flag arguments): launches
    #: that take different paths through a kernel's code differ in one of these.
    kinds: set[tuple[str, str, int, bool, tuple[bool, ...]]] = field(default_factory=set)
    threads: int = 0


launches_by_test: dict[str, LaunchRecord] = {}


def covering_tests(records: dict[str, LaunchRecord]) -> list[str]:
    """A few of the recorded tests that between them make every kind of launch that all of
    them make: greedily the test with the most kinds not yet made per host thread it starts
    (the emulation's cost), ties to the earlier test."""
    left = set().union(*(record.kinds for record in records.values()))
    chosen: list[str] = []
    while left:
        test = max(records, key=lambda name: len(records[name].kinds & left) / (records[name].threads + 32))
        chosen.append(test)
        left -= records[test].kinds
    return chosen


class EmulatedLauncher:
    """Stands in for ``sparseroute._cuda.Launcher``: same call, kernels run on the host."""

    def __init__(self) -> None:
        self.errors = torch.zeros(len(_cuda.ERROR_KINDS), dtype=torch.int32)
        self.error_pointer = self.errors.data_ptr()
        self.launches: list[tuple[str, int, int]] = []

    def __enter__(self) -> EmulatedLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

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
        if grid <= 0:
            return
        assert kernel in _cuda.kernel_names(file), kernel
        # Packed by the real launcher's own code: a layout error shows here as on the device.
        pointers = ctypes.c_void_p(_cuda.packed_arguments(file, kernel, args))
        self.launches.append((kernel, grid, block))
        if current_test is not None:
            record = launches_by_test.setdefault(current_test, LaunchRecord())
            flags = tuple(arg for arg in args if isinstance(arg, bool))
            record.kinds.add((kernel, str(dtype), block, grid > 1, flags))
            record.threads += grid * block
        status = library(file, dtype).sr_emulated_launch(kernel.encode(), grid, block, pointers)
        if status != 0:
            raise RuntimeError(f"emulated launch of {kernel} failed ({status})")


#: What the glue's uninitialised allocations hold under the emulation, by kind of dtype: a
#: device allocation holds whatever was there before, which on the host is often zeros.
_POISON = {"float": float("nan"), "bool": True, "int": 0x5A5A5A5A5A5A5A5A}


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.fill_(_POISON["float"])
    if tensor.dtype == torch.bool:
        return tensor.fill_(_POISON["bool"])
    if not tensor.is_complex():
        info = torch.iinfo(tensor.dtype)
        tensor.fill_(_POISON["int"] & info.max if info.min < 0 else _POISON["int"] % (info.max + 1))
    return tensor


class _PoisoningTorch:
    """``torch`` as the CUDA glue sees it under the emulation: ``empty`` and ``empty_like``
    return tensors filled with garbage (NaN, True, 0x5A5A...), so that an output a kernel
    leaves partly unwritten fails the tests instead of passing on the host's zeroed pages."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def empty(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _poisoned(self._module.empty(*args, **kwargs))

    def empty_like(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _poisoned(self._module.empty_like(*args, **kwargs))


@contextmanager
def emulated_cuda(monkeypatch: Any) -> Iterator[EmulatedLauncher]:
    """Within the block, sparseroute's CUDA glue launches on the host emulation, and its
    uninitialised allocations hold garbage (see ``_PoisoningTorch``)."""
    launcher = EmulatedLauncher()

    def fake_launcher(device: torch.device) -> EmulatedLauncher:
        assert device.type == "cpu", "the emulation runs with CPU tensors"
        return launcher

    monkeypatch.setattr(_cuda, "launcher", fake_launcher)
    monkeypatch.setattr(_cuda_ops, "torch", _PoisoningTorch(torch))
    yield launcher


def sanitizer_runtime(name: str) -> str | None:
    """A sanitizer runtime library of the emulation's compiler (``libtsan.so``,
    ``libasan.so``...), None without one."""
    host_compiler = compiler()
    if host_compiler is None:
        return None
    found = subprocess.run(
        [host_compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def use_mutated_kernels(work: str, file: str, old: str, new: str) -> None:
    """The kernel sources from now on: a copy in ``work`` with the one occurrence of ``old``
    in ``file`` replaced by ``new`` (the sanitizer tests' positive controls)."""
    folder = pathlib.Path(work)
    shutil.copytree(_cuda.kernel_dir(), folder, dirs_exist_ok=True)
    source = (folder / file).read_text()
    assert source.count(old) == 1, f"{file} changed: update the control that looks for {old!r}"
    (folder / file).write_text(source.replace(old, new))
    _cuda.kernel_dir = lambda: folder

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
from typing import Any

import torch

from sparseroute import _cuda

HEADER = pathlib.Path(__file__).with_name("cuda_emulation.h")
#: ``SPARSEROUTE_EMULATION_SANITIZER=thread`` builds the kernels with ThreadSanitizer (the
#: process must then preload libtsan: see test_cuda_races.py), which reports any access to
#: shared or global memory that races with another thread's between two barriers.
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
        defines += [f"-fsanitize={SANITIZER}", "-g"]
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


class EmulatedLauncher:
    """Stands in for ``sparseroute._cuda.Launcher``: same call, kernels run on the host."""

    def __init__(self) -> None:
        self.errors = torch.zeros(len(_cuda.ERROR_KINDS), dtype=torch.int32)
        self.launches: list[tuple[str, int, int]] = []

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
        status = library(file, dtype).sr_emulated_launch(kernel.encode(), grid, block, pointers)
        if status != 0:
            raise RuntimeError(f"emulated launch of {kernel} failed ({status})")


@contextmanager
def emulated_cuda(monkeypatch: Any) -> Iterator[EmulatedLauncher]:
    """Within the block, sparseroute's CUDA glue launches on the host emulation."""
    launcher = EmulatedLauncher()

    @contextmanager
    def fake_launcher(device: torch.device) -> Iterator[EmulatedLauncher]:
        assert device.type == "cpu", "the emulation runs with CPU tensors"
        yield launcher

    monkeypatch.setattr(_cuda, "launcher", fake_launcher)
    yield launcher

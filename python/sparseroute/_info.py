"""``sparseroute.info()`` and ``python -m sparseroute info``: what this installation can run."""

from __future__ import annotations

import torch

from sparseroute import _cuda, _cuda_ops
from sparseroute._core import __version__, simd_level
from sparseroute._threads import get_num_threads


def _cupy_version() -> str | None:
    if not _cuda._CUPY_FOUND:
        return None
    try:
        return str(_cuda.cupy_module().__version__)
    except ImportError as err:  # a broken CuPy installation: say so instead of failing
        return f"unusable ({err})"


def _nvrtc() -> str | None:
    try:
        backend = _cuda.nvrtc_backend()
    except ImportError:
        return None
    major, minor = backend.version()
    return f"{major}.{minor} (via {backend.name})"


def info() -> dict[str, object]:
    """A description of this installation: sparseroute's version, its CPU thread count and
    the instruction set of its CPU kernels ("avx512", "avx2" or "baseline", see
    ``SPARSEROUTE_SIMD`` in docs/semantics.md), torch
    and its CUDA, CuPy and NVRTC (``None`` when missing), the current CUDA device, the ops with
    CUDA kernels and where their sources are.

    ``python -m sparseroute info`` prints it."""
    cuda_available = torch.cuda.is_available()
    device = None
    if cuda_available:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        device = f"cuda:{index} {torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    sources = _cuda.kernel_dir()
    return {
        "version": __version__,
        "rust_threads": get_num_threads(),
        "cpu_simd": simd_level(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_available,
        "cupy": _cupy_version(),
        "nvrtc": _nvrtc(),
        "device": device,
        "cuda_ops": list(_cuda_ops.CUDA_OPS),
        "cuda_sources": str(sources),
        "cuda_source_files": sorted(p.name for p in sources.iterdir() if p.suffix in (".cu", ".cuh")),
    }


def format_info() -> str:
    """``info()`` as aligned ``name: value`` lines."""
    values = info()
    missing = {
        "cupy": f"not installed ({_cuda.CUPY_INSTALL_HINT})",
        "nvrtc": "not found",
        "device": "none",
        "torch_cuda": "none (a CPU build of torch)",
    }
    lines = []
    for name, value in values.items():
        if value is None:
            text = missing.get(name, "none")
        elif isinstance(value, list):
            text = ", ".join(str(v) for v in value)
        else:
            text = str(value)
        lines.append(f"{name + ':':<19} {text}")
    return "\n".join(lines)

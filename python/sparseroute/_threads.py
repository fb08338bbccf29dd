"""How many threads the Rust kernels use.

By default sparseroute follows ``torch.get_num_threads()``, read at every call, so
``torch.set_num_threads`` governs both. ``set_num_threads`` overrides it for sparseroute alone.
"""

from __future__ import annotations

import torch

_override: int | None = None


def set_num_threads(num_threads: int | None) -> None:
    """Use ``num_threads`` threads in sparseroute's CPU kernels (``None``: follow torch).

    Results do not depend on this setting: every kernel is bitwise deterministic for any
    thread count.
    """
    global _override
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise TypeError(f"num_threads: expected an int or None, got {type(num_threads).__name__}")
        if num_threads < 1:
            raise ValueError(f"num_threads: expected at least 1, got {num_threads}")
    _override = num_threads


def get_num_threads() -> int:
    """The number of threads sparseroute's CPU kernels use now."""
    return _override if _override is not None else torch.get_num_threads()

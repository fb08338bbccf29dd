"""Defining sparseroute's custom ops, and calling them eagerly without torch's dispatcher.

Every op is a ``torch.library.custom_op``: that is what makes it traceable by
``torch.compile``, fake tensors, ``opcheck`` and every other torch subsystem. But a custom op
called eagerly pays for that generality on every call: the C++ dispatcher hands the call back
to Python, the autograd layer wraps it, and the device kernel runs last. For a routing op on a
GPU, whose kernel takes a few microseconds, that host work is most of the call: measured on an
H100 machine, a top-k gating call spent 60 of its 125 host microseconds in dispatch, and 170
of 260 when the logits required a gradient (benches/gpu_overhead.py).

So the Python faces call ``call(name, *args)``. In plain eager code (no compilation, no
tracing, no torch dispatch or function mode, no functorch transform, no profiler, plain
tensors all on one device type) it runs the op's own kernel for that device directly, or,
when autograd must record the call, the op's own ``setup_context`` and ``backward`` through a
``torch.autograd.Function``. Anywhere else it calls the op through ``torch.ops.sparseroute``,
so every torch subsystem sees the op. Both routes run the same kernel, save the same tensors
and compute the same gradients; the tests compare them. ``SPARSEROUTE_DISPATCHER=1`` in the
environment sends every call through the dispatcher.

The ops are defined with ``custom_op`` and ``register_autograd`` here (thin wrappers over
torch.library's, which also keep the pieces the direct route needs), and the CUDA kernels are
registered with ``register_kernel``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch._library.custom_ops import CustomOpDef

#: The default namespace of every op (``torch.ops.sparseroute.*``).
NAMESPACE = "sparseroute"

_Fn = TypeVar("_Fn", bound=Callable[..., Any])

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


class _Op:
    """What the direct route needs of one custom op: its kernel per device type, its autograd
    formula (None without one) and, made on first use, that formula around each kernel as a
    ``torch.autograd.Function``; the positions of its tensor arguments; and the dispatcher's
    entry."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kernels: dict[str, Callable[..., Any]] = {}
        # The arguments whose schema type is Tensor or Optional[Tensor] (set with the op):
        # only those can hold a tensor, so only those are looked at on each call.
        self.tensor_positions: tuple[int, ...] = ()
        self.autograd: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self.functions: dict[str, type[torch.autograd.Function]] = {}
        self.dispatcher: Callable[..., Any] | None = None

    def function(self, device_type: str) -> type[torch.autograd.Function]:
        function = self.functions.get(device_type)
        if function is None:
            assert self.autograd is not None
            backward, setup_context = self.autograd
            kernel = self.kernels[device_type]

            # The forward takes ctx itself (and runs setup_context on it) rather than being
            # split from a setup_context method: for that form Function.apply binds the
            # arguments to the signature with inspect on every call.
            def forward(ctx: Any, *args: Any) -> Any:
                output = kernel(*args)
                setup_context(ctx, args, output)
                return output

            function = type(
                f"{self.name}_{device_type}",
                (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)},
            )
            self.functions[device_type] = function
        return function


_OPS: dict[str, _Op] = {}
_NAME_OF: dict[int, str] = {}


def _direct_enabled() -> bool:
    return os.environ.get("SPARSEROUTE_DISPATCHER", "0") in ("", "0")


_DIRECT = _direct_enabled()


def custom_op(name: str, *, device_types: str | Sequence[str]) -> Callable[[_Fn], CustomOpDef]:
    """``torch.library.custom_op("sparseroute::<name>", mutates_args=())`` for the function it
    decorates, which is the op's kernel for ``device_types``. Returns torch's op object (for
    ``register_fake``)."""

    def define(kernel: _Fn) -> CustomOpDef:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), device_types=device_types)(
            kernel
        )
        entry = _OPS.setdefault(name, _Op(name))
        for device_type in (device_types,) if isinstance(device_types, str) else device_types:
            entry.kernels[device_type] = kernel
        entry.tensor_positions = _tensor_positions(name)
        _NAME_OF[id(op)] = name
        return op

    return define


def _tensor_positions(name: str) -> tuple[int, ...]:
    """The positions of op ``name``'s Tensor and Optional[Tensor] arguments, from its schema."""
    schema = getattr(getattr(torch.ops, NAMESPACE), name).default._schema
    return tuple(
        position
        for position, argument in enumerate(schema.arguments)
        if str(argument.type) in ("Tensor", "Optional[Tensor]")
    )


def register_autograd(
    op: CustomOpDef,
    backward: Callable[..., Any],
    *,
    setup_context: Callable[[Any, tuple[Any, ...], Any], None],
) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, and the same formula as
    a ``torch.autograd.Function`` for the direct route."""
    op.register_autograd(backward, setup_context=setup_context)
    entry = _OPS[_NAME_OF[id(op)]]
    entry.autograd = (backward, setup_context)
    entry.functions.clear()


def register_kernel(name: str, device_type: str, kernel: Callable[..., Any]) -> None:
    """``torch.library.register_kernel`` of ``kernel`` for ``device_type`` on op ``name``,
    also used by the direct route."""
    torch.library.register_kernel(f"{NAMESPACE}::{name}", device_type, kernel)
    entry = _OPS.setdefault(name, _Op(name))
    entry.kernels[device_type] = kernel
    entry.functions.pop(device_type, None)


def _plain_eager() -> bool:
    """Whether nothing in torch needs to see a call go through the dispatcher."""
    return not (
        torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._profiler_enabled()
    )


def call(name: str, *args: Any) -> Any:
    """Calls op ``sparseroute::<name>`` with positional ``args`` (every schema argument, in
    order): directly where that is safe (see the module docstring), else through
    ``torch.ops.sparseroute``."""
    if torch.compiler.is_compiling():
        # Dynamo traces this function: hand it the op itself, nothing of the registry.
        return getattr(getattr(torch.ops, NAMESPACE), name)(*args)
    entry = _OPS[name]
    if _DIRECT and _plain_eager():
        found = _device_and_grad(args, entry.tensor_positions)
        if found is not None:
            device_type, needs_grad = found
            kernel = entry.kernels.get(device_type)
            if kernel is not None:
                if not (needs_grad and torch.is_grad_enabled()):
                    return kernel(*args)
                if entry.autograd is not None:
                    return entry.function(device_type).apply(*args)
    if entry.dispatcher is None:
        entry.dispatcher = getattr(getattr(torch.ops, NAMESPACE), name)
    return entry.dispatcher(*args)


def _device_and_grad(args: tuple[Any, ...], positions: tuple[int, ...]) -> tuple[str, bool] | None:
    """The one device type of the tensors at ``positions`` of ``args`` (the op's tensor
    arguments; None is skipped) and whether any requires a gradient; None for anything else
    there (a tensor subclass, or not a tensor: the dispatcher then reports it), tensors on
    several device types, or no tensor."""
    device_type = None
    needs_grad = False
    for position in positions:
        arg = args[position]
        if arg is None:
            continue
        if type(arg) not in _PLAIN_TENSORS:
            return None
        # (is_cuda and is_cpu are flags; .device builds an object: a tenth of the cost.)
        this_type = "cuda" if arg.is_cuda else "cpu" if arg.is_cpu else arg.device.type
        if device_type is None:
            device_type = this_type
        elif this_type != device_type:
            return None
        needs_grad = needs_grad or arg.requires_grad
    return None if device_type is None else (device_type, needs_grad)

"""The CUDA ops as torch ops: opcheck, torch.compile(fullgraph=True), CUDA graph capture and
replay after warm-up, torch's current (non-default) stream, several dtypes, the loader."""

import subprocess
import sys
import threading

import pytest
import torch
from gpu_helpers import random_experts

import sparseroute
from sparseroute import _cuda, _cuda_ops

ops = torch.ops.sparseroute


def gating_args():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 12, generator=g).cuda().requires_grad_()
    bias = (torch.randn(12, generator=g) * 0.1).cuda()
    return [
        (logits, 3, "softmax", True, None, None, None, 2, 1.0),
        (logits, 4, "sigmoid", True, bias, 4, 2, 2, 2.5),
        (logits.detach().double().requires_grad_(), 2, "softmax", False, None, None, None, 2, 1.0),
        (logits.detach().bfloat16().requires_grad_(), 2, "sigmoid", False, None, None, None, 2, 1.0),
        (torch.randn(0, 5, device="cuda", requires_grad=True), 2, "softmax", True, None, None, None, 2, 1.0),
        (
            torch.randn(7, 700, device="cuda", requires_grad=True),
            *(5, "softmax", True, None, None, None, 2, 1.0),
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck_topk_gating(case):
    torch.library.opcheck(ops.topk_gating, gating_args()[case])


def test_opcheck_topk_gating_backward():
    logits = torch.randn(9, 12, device="cuda")
    weights, experts = sparseroute.topk_gating(logits, 3)
    torch.library.opcheck(
        ops.topk_gating_backward, (logits, experts, torch.randn_like(weights), "softmax", True, 1.0)
    )


@pytest.mark.parametrize("num_rows", [None, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_permute(num_rows, dtype):
    x = torch.randn(10, 6, device="cuda", dtype=dtype, requires_grad=True)
    experts = random_experts(10, 2, 5, seed=1).cuda()
    torch.library.opcheck(ops.permute, (x, experts, 5, num_rows, None, None, False))


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_unpermute_and_its_gradient_ops(weighted):
    x = torch.randn(10, 6, device="cuda")
    experts = random_experts(10, 2, 5, seed=1).cuda()
    x_sorted, plan = sparseroute.permute(x, experts, 5, num_rows=20)
    y_sorted = torch.randn_like(x_sorted, requires_grad=True)
    weights = torch.rand(10, 2, device="cuda", requires_grad=True) if weighted else None
    torch.library.opcheck(ops.unpermute, (y_sorted, plan.slot_to_row, plan.row_to_slot, weights))
    grad_y = torch.randn(10, 6, device="cuda")
    torch.library.opcheck(
        ops.gather_rows, (grad_y, plan.row_to_slot, 2, None if weights is None else weights.detach())
    )
    torch.library.opcheck(ops.slot_dots, (grad_y, x_sorted, plan.slot_to_row))


def moe_pipeline(logits, x, w, num_rows):
    weights, experts = sparseroute.topk_gating(logits, 2)
    x_sorted, plan = sparseroute.permute(x, experts, logits.shape[1], num_rows=num_rows)
    y_sorted = torch.tanh(x_sorted @ w)
    return sparseroute.unpermute(y_sorted, plan, weights)


def pipeline_inputs(dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 8, generator=g).to("cuda", dtype).requires_grad_()
    x = torch.randn(64, 32, generator=g).to("cuda", dtype).requires_grad_()
    w = torch.randn(32, 32, generator=g).to("cuda", dtype).requires_grad_()
    return logits, x, w


@pytest.mark.parametrize("static_rows", [True, False])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_pipeline_compiles_without_graph_breaks(static_rows, backend):
    logits, x, w = pipeline_inputs()
    num_rows = 128 if static_rows else None
    torch._dynamo.reset()
    compiled = torch.compile(moe_pipeline, fullgraph=True, backend=backend)
    expected = moe_pipeline(logits, x, w, num_rows)
    expected_grads = torch.autograd.grad(expected.square().sum(), (logits, x, w))
    actual = compiled(logits, x, w, num_rows)
    actual_grads = torch.autograd.grad(actual.square().sum(), (logits, x, w))
    torch.testing.assert_close(actual, expected)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pipeline_matches_the_cpu_in_several_dtypes(dtype):
    inputs = pipeline_inputs(dtype, seed=3)
    gpu = moe_pipeline(*inputs, 128)
    cpu = moe_pipeline(*(t.detach().cpu().requires_grad_() for t in inputs), 128)
    tolerance = {"rtol": 5e-2, "atol": 5e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), **tolerance)


def test_warm_up_compiles_every_module():
    loaded = sparseroute.warm_up_cuda()
    assert len(loaded) == len(_cuda.module_keys())
    index = torch.cuda.current_device()
    cached = {(file, dtype) for i, file, dtype, _arch in _cuda.cached_modules() if i == index}
    assert cached == set(_cuda.module_keys())
    major, minor = torch.cuda.get_device_capability(index)
    assert all(
        arch.endswith(f"_{major}{minor}") or arch.startswith("compute_")
        for *_, arch in _cuda.cached_modules()
    )


def test_cuda_graph_capture_and_replay():
    sparseroute.warm_up_cuda()
    logits, x, w = (t.detach() for t in pipeline_inputs(seed=4))
    static_inputs = [t.clone() for t in (logits, x, w)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on the side stream, as torch recommends before capture
            moe_pipeline(*static_inputs, 128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe_pipeline(*static_inputs, 128)
    for seed in (5, 6):
        fresh = [t.detach() for t in pipeline_inputs(seed=seed)]
        for static, new in zip(static_inputs, fresh, strict=True):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, moe_pipeline(*fresh, 128), rtol=1e-6, atol=1e-6)


def test_ops_run_on_the_current_stream():
    """The kernels must run on torch's current stream: here a side stream whose input is only
    ready after a long sleep kernel. On any other stream they would read it too early."""
    source = torch.randn(4096, 64, device="cuda")
    experts = random_experts(4096, 2, 16, seed=3).cuda()
    weights = torch.rand(4096, 2, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.zeros_like(source)
        torch.cuda._sleep(200_000_000)
        x.copy_(source)
        w, e = sparseroute.topk_gating(x, 2)
        x_sorted, plan = sparseroute.permute(x, experts, 16, num_rows=8192)
        y = sparseroute.unpermute(x_sorted, plan, weights)
    stream.synchronize()
    ref_w, ref_e = sparseroute.topk_gating(source.cpu(), 2)
    assert torch.equal(e.cpu(), ref_e)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    x_ref, plan_ref = sparseroute.permute(source.cpu(), experts.cpu(), 16, num_rows=8192)
    assert torch.equal(x_sorted.cpu(), x_ref)
    assert torch.equal(y.cpu(), sparseroute.unpermute(x_ref, plan_ref, weights.cpu()))


def test_ops_run_from_a_new_thread():
    """Kernels are launched through the driver API, which needs the device's context current
    in the calling thread: a thread that has not used CUDA before must work too, with the
    same results and its own argument buffers."""
    logits = torch.randn(4096, 64, device="cuda")
    expected = sparseroute.topk_gating(logits, 4)
    results = []

    def route() -> None:
        results.append(sparseroute.topk_gating(logits, 4))
        torch.cuda.synchronize()

    thread = threading.Thread(target=route)
    thread.start()
    thread.join()
    assert len(results) == 1
    assert torch.equal(results[0][1], expected[1])
    assert torch.equal(results[0][0], expected[0])


def test_a_fresh_process_can_load_the_modules_before_any_other_cuda_work():
    """warm_up_cuda() as a process's first CUDA call: the modules are loaded into the device's
    context, which nothing has made current yet."""
    code = (
        "import torch, sparseroute\n"
        "sparseroute.warm_up_cuda()\n"
        "weights, experts = sparseroute.topk_gating(torch.randn(8, 16, device='cuda'), 2)\n"
        "torch.cuda.synchronize()\n"
        "print(tuple(experts.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(8, 2)"


def test_modules_are_loaded_as_driver_functions():
    module = _cuda.load_module(torch.cuda.current_device(), "gating.cu", torch.float32)
    assert set(module.functions) == set(_cuda.kernel_names("gating.cu"))
    assert all(isinstance(handle, int) and handle for handle in module.functions.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    logits = torch.randint(0, 5, (50, 16)).float()
    gpu = sparseroute.topk_gating(logits.to("cuda:1"), 3)
    assert gpu[1].device == torch.device("cuda:1")
    assert torch.equal(gpu[1].cpu(), sparseroute.topk_gating(logits, 3)[1])


def test_info_reports_the_device_and_cupy():
    info = sparseroute.info()
    assert info["cuda_available"] is True
    assert info["cupy"] and info["nvrtc"] and info["device"]
    assert info["cuda_ops"] == list(_cuda_ops.CUDA_OPS)


def test_cupys_own_nvrtc_compiles_the_modules_too():
    """The loader's fallback NVRTC binding (when cuda-python is missing)."""
    backend = _cuda.nvrtc_backend("cupy")
    arch = _cuda.device_arch(torch.cuda.current_device(), backend)
    for file, dtype in [("plan.cu", None), ("rows.cu", torch.bfloat16), ("gating.cu", torch.float32)]:
        module = _cuda.compile_module(file, dtype, arch, backend)
        assert module.binary and module.log == ""


def test_capture_without_warm_up_is_refused(monkeypatch):
    monkeypatch.setattr(_cuda, "_modules", {})
    graph = torch.cuda.CUDAGraph()
    x = torch.randn(8, 4, device="cuda")
    with pytest.raises(RuntimeError, match="warm_up_cuda"), torch.cuda.graph(graph):
        sparseroute.topk_gating(x, 2)

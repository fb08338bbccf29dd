"""Process-level behaviour: fork safety of the Rust helper threads, and that the tests run against
the installed wheel with its stub and type marker."""

import multiprocessing
import pathlib
import subprocess
import sys

import torch

import sparseroute


def _route_in_child(queue):
    logits = torch.randn(4096, 64, generator=torch.Generator().manual_seed(3))
    sparseroute.set_num_threads(2)
    _, experts = sparseroute.topk_gating(logits, 4)
    queue.put(experts.sum().item())


def test_forked_child_does_not_deadlock():
    # Start the parent's helper threads, then fork: the child inherits the team object but
    # not its threads, and must start its own.
    sparseroute.set_num_threads(2)
    logits = torch.randn(4096, 64, generator=torch.Generator().manual_seed(3))
    expected = sparseroute.topk_gating(logits, 4)[1].sum().item()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_route_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        raise AssertionError("the forked child deadlocked in a routing kernel")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected


def test_tests_import_the_installed_wheel():
    package_dir = pathlib.Path(sparseroute.__file__).resolve().parent
    repo_source = pathlib.Path(__file__).resolve().parent.parent / "python" / "sparseroute"
    assert package_dir != repo_source.resolve(), "tests must run against the installed package"
    assert "site-packages" in package_dir.parts
    assert (package_dir / "py.typed").is_file()
    assert (package_dir / "_core.pyi").is_file()


def test_stub_matches_the_compiled_module():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "sparseroute._core"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rust_panics_and_errors_surface_as_exceptions():
    # A kernel error is an exception; the interpreter survives and keeps working.
    try:
        sparseroute.permute(torch.randn(2, 2), torch.tensor([[5], [0]]), 2)
    except ValueError as err:
        assert "experts" in str(err)
    else:
        raise AssertionError("expected a ValueError")
    assert sparseroute.topk_gating(torch.randn(2, 3), 1)[1].shape == (2, 1)

"""benches/gpu_ab.py and scripts/gpu-ab.sh, checked on the CPU: every case the GPU comparison
times runs, the host time is the median batch per call, and `prepare` writes the kernel sources
(or with --host the Python code) of the commits it is given."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"


@pytest.fixture(scope="module")
def gpu_ab():
    spec = importlib.util.spec_from_file_location("gpu_ab", BENCHES / "gpu_ab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_case_runs(gpu_ab):
    groups = gpu_ab.case_groups("cpu", shrink=64)
    assert tuple(groups) == gpu_ab.GROUPS
    names = []
    for build in groups.values():
        cases = build()
        assert cases
        for name, shape, call in cases:
            assert call() is not None
            names.append((name, shape))
    assert len(names) == len(set(names))


def test_arguments_are_checked_before_the_device(gpu_ab, capsys):
    assert gpu_ab.main([]) == 2
    assert gpu_ab.main(["new", "gating", "permutes"]) == 2
    assert gpu_ab.main(["new", "--host", "permutes"]) == 2
    assert "permutes" in capsys.readouterr().out


def test_host_time_is_the_median_batch_per_call(gpu_ab, monkeypatch):
    """A fake clock: each call of batch b (after three warm-up calls) takes (b + 1)^2 ms; the GPU is
    synchronised around every batch and never inside one."""
    clock = {"now": 0.0, "batch": -1, "calls": 0}
    events = []

    def synchronize():
        events.append(("sync", clock["calls"]))

    def call():
        clock["calls"] += 1
        if clock["calls"] > 3:  # past the three warm-up calls
            clock["batch"] = (clock["calls"] - 4) // 10
            clock["now"] += (clock["batch"] + 1) ** 2 / 1000
        return 1

    monkeypatch.setattr(gpu_ab.torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(gpu_ab.time, "perf_counter", lambda: clock["now"])
    assert gpu_ab.host_ms(call, calls=10, batches=5) == pytest.approx(9.0)  # the mean is 11
    assert [calls for _, calls in events] == [3, 13, 23, 33, 43, 53]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_nothing_is_timed(gpu_ab, capsys):
    assert gpu_ab.main(["new", "gating"]) == 1
    assert "CUDA is not available" in capsys.readouterr().out


def test_a_group_that_cannot_be_built_leaves_the_others_running(gpu_ab, capsys):
    """A set of kernel sources whose kernels take other parameters fails where a group's
    setup launches one: that group says so, and the others are still timed."""

    def broken() -> list:
        raise TypeError("sr_plan_small: the arguments do not fit its parameters")

    groups = {"broken": broken, "fine": lambda: [("op", "T=1", lambda: 1)]}
    timed = []

    def time_ms(call, name):
        timed.append(name)
        return 0.0125 if call() == 1 else None

    gpu_ab.run_groups("old", groups, ["broken", "fine"], time_ms)
    lines = capsys.readouterr().out.splitlines()
    error = "TypeError: sr_plan_small: the arguments do not fit its parameters"
    assert lines[0] == f"old        broken: inputs not built: {error}"
    assert lines[1].split() == ["old", "op", "T=1", "12.50", "us"]
    assert timed == [" (op)"]


def git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    return result.returncode == 0


@pytest.mark.skipif(not git_checkout(), reason="needs a git checkout of sparseroute")
def test_prepare_writes_each_commits_kernel_sources(tmp_path):
    script = ROOT / "scripts" / "gpu-ab.sh"
    result = subprocess.run(
        ["bash", str(script), "prepare", "HEAD"],
        env={"PATH": "/usr/bin:/bin", "AB_DIR": str(tmp_path / "ab")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    written = tmp_path / "ab" / head
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", "HEAD", "python/sparseroute/cuda/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(p.name for p in written.iterdir()) == sorted(pathlib.Path(p).name for p in listed)
    for path in listed:
        committed = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"HEAD:{path}"], capture_output=True, check=True
        ).stdout
        assert (written / pathlib.Path(path).name).read_bytes() == committed


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True).stdout


@pytest.mark.skipif(not git_checkout(), reason="needs a git checkout of sparseroute")
def test_prepare_host_writes_each_commits_python_code(tmp_path):
    script = ROOT / "scripts" / "gpu-ab.sh"
    env = {"PATH": "/usr/bin:/bin", "AB_DIR": str(tmp_path / "ab")}
    result = subprocess.run(["bash", str(script), "prepare", "--host", "HEAD"], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr
    head = _git("rev-parse", "--short", "HEAD").decode().strip()
    written = tmp_path / "ab" / head
    listed = _git("ls-tree", "-r", "--name-only", "HEAD", "python/sparseroute/").decode().split()
    python = [p for p in listed if p.endswith(".py")]
    assert "python/sparseroute/_cuda_ops.py" in python and "python/sparseroute/ops/gating.py" in python
    assert sorted(str(p.relative_to(written)) for p in written.rglob("*") if p.is_file()) == sorted(
        p.removeprefix("python/") for p in python
    ), "the package's Python files, and nothing else (no kernel sources, no stubs)"
    for path in python:
        assert (written / path.removeprefix("python/")).read_bytes() == _git("show", f"HEAD:{path}")


@pytest.mark.skipif(not git_checkout(), reason="needs a git checkout of sparseroute")
def test_prepare_host_refuses_a_commit_whose_kernels_or_core_differ(tmp_path):
    # The first commit that touched the kernel sources: they have changed since.
    first = _git("log", "--reverse", "--format=%H", "--", "python/sparseroute/cuda/").decode().split()
    if not first:
        pytest.skip("no commit of the kernel sources in this checkout's history")
    script = ROOT / "scripts" / "gpu-ab.sh"
    env = {"PATH": "/usr/bin:/bin", "AB_DIR": str(tmp_path / "ab")}
    result = subprocess.run(
        ["bash", str(script), "prepare", "--host", first[0]], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "core stubs or kernel sources differ from HEAD's" in result.stderr


def test_usage_without_a_step():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-ab.sh")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stderr

"""benches/gpu_ab.py and scripts/gpu-ab.sh, checked on the CPU: every case the GPU comparison
times runs, and `prepare` writes the kernel sources of the commits it is given."""

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
    assert "permutes" in capsys.readouterr().out


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


def test_usage_without_a_step():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-ab.sh")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stderr

"""`make demo` (``python -m sparseroute demo``): every model it shows runs the three ways, the
patched model matches transformers' eager experts, and the report says so.

The demo's own shapes, on fewer tokens and one timed round, in a subprocess as `make demo`
runs it."""

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers", minversion="5.0")

from sparseroute import _demo


def test_demo_runs_every_model_and_matches_eager(tmp_path: pathlib.Path):
    heatmap = tmp_path / "load.png"
    command = [sys.executable, "-m", "sparseroute", "demo", "--repeats", "1", "--batch", "1"]
    command += ["--seq-len", "32", "--heatmap", str(heatmap)]
    report = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True).stdout
    assert "the three implementations taking turns" in report
    for spec in _demo.MODELS:
        section = report[report.index(spec.name) :]
        layers = spec.values["num_hidden_layers"]
        assert section.startswith(f"{spec.name}: {layers} MoE layers patched"), section[:200]
        for stage in ("forward", "forward_backward"):
            # Three times in ms and two ratios, all positive.
            found = re.search(
                rf"^  {stage} +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)x +([\d.]+)x$", section, re.M
            )
            assert found and all(float(value) > 0 for value in found.groups()), section[:400]
        found = re.search(r"max \|diff\| vs eager: logits ([\d.e+-]+), gradients ([\d.e+-]+)", section)
        assert found, section[:600]
        logits, gradients = map(float, found.groups())
        assert logits < 1e-4 and gradients < 1e-4, (spec.name, logits, gradients)
        charts = re.findall(r"^    layer (\d+)  \|", section[: section.find("\n\n")], re.M)
        assert charts == [str(layer) for layer in range(layers)], section[:800]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "Install matplotlib" in report
    else:
        assert heatmap.stat().st_size > 0 and str(heatmap.resolve()) in report


def test_best_times_lets_the_models_take_turns(monkeypatch):
    """Each round times every model's pass before the next round: the calls interleave."""
    calls: list[tuple[str, str]] = []

    def fake_passes(model, input_ids):
        return {
            stage: (lambda stage=stage: calls.append((model, stage)))
            for stage in ("forward", "forward_backward")
        }

    monkeypatch.setattr(_demo, "passes", fake_passes)
    times = _demo.best_times({"a": "a", "b": "b"}, None, repeats=2)
    warm_up = [("a", "forward"), ("a", "forward_backward"), ("b", "forward"), ("b", "forward_backward")]
    one_round = [("a", "forward"), ("b", "forward"), ("a", "forward_backward"), ("b", "forward_backward")]
    assert calls == warm_up + one_round * 2
    assert set(times) == {"a", "b"} and all(0 <= t < 1 for stage in times.values() for t in stage.values())

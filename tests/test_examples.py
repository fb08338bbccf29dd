"""The examples of the docs run and do what they say.

- Mixture-of-Depths: it trains: its loss falls, its MoD blocks keep exactly their capacity,
  its routers learn through the gate, and its causal predictor agrees with the routers' top-k
  more often than always answering "not kept" would.
- Block-sparse experts: it takes training steps compiled with fullgraph=True, and its
  block-by-block matmuls give the per-expert loop's output.
"""

import importlib
import pathlib
import sys
from types import ModuleType

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples"


def import_example(name: str) -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_mixture_of_depths_example_trains():
    report = import_example("mixture_of_depths").train(steps=150)
    assert report.final_loss < 0.25 * report.first_loss, report
    assert report.kept_fraction == 0.25, report
    assert report.router_change > 0.05, report
    assert report.predictor_agreement > 0.8, report


def test_block_sparse_experts_example_matches_per_expert_matmuls():
    assert import_example("block_sparse_experts").run(tokens=96) < 1e-5

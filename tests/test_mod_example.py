"""The Mixture-of-Depths example of the docs trains: its loss falls, its MoD blocks keep
exactly their capacity, its routers learn through the gate, and its causal predictor
agrees with the routers' top-k more often than always answering "not kept" would."""

import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_mixture_of_depths_example_trains():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import mixture_of_depths
    finally:
        sys.path.remove(str(EXAMPLES))
    report = mixture_of_depths.train(steps=150)
    assert report.final_loss < 0.25 * report.first_loss, report
    assert report.kept_fraction == 0.25, report
    assert report.router_change > 0.05, report
    assert report.predictor_agreement > 0.8, report

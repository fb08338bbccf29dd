"""The block-sparse experts example of the docs: it takes training steps compiled with
fullgraph=True, and its block-by-block matmuls give the per-expert loop's output."""

import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_block_sparse_experts_example_matches_per_expert_matmuls():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import block_sparse_experts
    finally:
        sys.path.remove(str(EXAMPLES))
    assert block_sparse_experts.run(tokens=96) < 1e-5

"""Invalid input on the GPU: the cases of tests/invalid_input_cases.py, the same inputs and
expectations as under the emulation (test_cuda_emulated.py), on the real kernels, atomics
included. Each case's counts are read back by kind through ``sparseroute.check_cuda_errors()``,
which raises naming every kind it found, and clears them."""

import pytest

import invalid_input_cases
import sparseroute
from sparseroute import InvalidInputError, _cuda


def counted(expected: list[int]) -> None:
    """check_cuda_errors() names exactly the ``expected`` counts."""
    found = "; ".join(
        f"{count} {kind}" for count, kind in zip(expected, _cuda.ERROR_KINDS, strict=True) if count
    )
    with pytest.raises(InvalidInputError) as raised:
        sparseroute.check_cuda_errors()
    assert str(raised.value).endswith("since the last check: " + found)


@pytest.mark.parametrize("case", list(invalid_input_cases.CASES))
def test_invalid_input_is_counted_and_handled(case):
    invalid_input_cases.CASES[case]("cuda", counted)

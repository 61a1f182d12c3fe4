"""Bounded, seeded fuzzing in CI (tools/fuzz.py runs longer): random graphs through every pass, and
mutated/truncated model and calibration bytes through the CLI."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fuzz  # noqa: E402


@pytest.mark.slow
def test_fuzz_random_graphs_through_every_pass():
    counts = fuzz.fuzz_graphs(8, seed=1000)
    assert counts["crashed"] == 0 and counts["invalid"] == 0, counts["problems"][:5]
    assert counts["ok"] >= 8 * 15  # every pass ran on every graph (refusals would be listed)


@pytest.mark.slow
def test_fuzz_corrupted_files_get_one_line_errors():
    counts = fuzz.fuzz_bytes(150, seed=7)
    assert counts["bad"] == 0, counts["problems"][:5]
    assert counts["exit_2"] > 100  # most corruptions must be caught as bad input


def test_fuzz_generator_is_deterministic_and_valid():
    import onnx

    a, b = fuzz.random_graph(3), fuzz.random_graph(3)
    assert a.SerializeToString() == b.SerializeToString()
    onnx.checker.check_model(a, full_check=True)

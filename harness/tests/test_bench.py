"""Specifications of harness/bench.py's parsing of the TRL anchor's output (the benchmarks
themselves print ratios measured in one run; they are not timed tests)."""
import pytest

from harness import bench


def test_trl_step_times_are_read_from_either_output():
    anchor = "TRL 1.16.0 + PEFT TinyLoRA (13 trainable): step times [120.5, 98.25, 130.0], median"
    assert bench.trl_median(anchor + " 120.5 s, total 400 s") == 120.5
    assert bench.trl_median('{"step_s": [3.0, 1.0]}') == 2.0
    with pytest.raises(ValueError, match="no step times"):
        bench.trl_median("Traceback (most recent call last):")

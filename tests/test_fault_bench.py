"""bench/fault_bench.py --quick: the cheap half of the battery passes and prints its totals."""

import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import fault_bench  # noqa: E402


def test_the_quick_battery_passes_and_prints_the_figures():
    stream = io.StringIO()
    # The serving half has its own smoke test (tests/test_serving_fault_bench.py).
    outcomes = fault_bench.run_battery(quick=True, stream=stream, serving=False)
    failed = [(o.name, o.detail) for o in outcomes if not o.ok]
    assert not failed, failed
    figures = fault_bench.totals(outcomes)
    assert figures["bad_inputs_tried"] >= 8 and figures["faults_injected"] >= 3
    assert figures["bad_inputs_rejected_clearly"] == figures["bad_inputs_tried"]
    assert figures["faults_survived"] == figures["faults_injected"]
    assert figures["records_lost"] == 0
    text = fault_bench.format_totals(figures, serving_run=False)
    assert "faults injected / survived: " in text and "bad inputs tried / rejected clearly" in text
    assert stream.getvalue().count("[ok]") == len(
        [o for o in outcomes if o.kind in (fault_bench.BAD_INPUT, fault_bench.FAULT)])


def test_a_case_with_a_wrong_outcome_is_reported_failed(monkeypatch):
    def accepts_everything(root):
        fault_bench.refused(lambda: None, ValueError, "anything")
    monkeypatch.setattr(fault_bench, "CASES", [fault_bench.Case(
        fault_bench.BAD_INPUT, "an input nobody refuses", True, accepts_everything)])
    outcomes = fault_bench.run_battery(quick=True, stream=io.StringIO(), serving=False)
    assert [(o.ok, o.detail) for o in outcomes] == [(False, "Failed: accepted")]

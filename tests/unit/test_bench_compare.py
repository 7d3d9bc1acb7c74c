"""The pure parts of ``python -m bench --compare REV``: who runs first, what is
measured, and how two revisions' runs become ratios (no timing here)."""

from __future__ import annotations

import pytest

from bench import compare

QUICK = {"shapes": [(1, 500), (100, 50)], "latency_samples": 50, "enqueue_one": 200, "enqueue_bulk": 5000}


def test_the_sides_take_turns_going_first() -> None:
    runs = [compare.order(["current", "v1"], run) for run in range(4)]
    assert runs == [["current", "v1"], ["v1", "current"], ["current", "v1"], ["v1", "current"]]
    flat = [label for run in runs for label in run]
    # Each side runs first as often as the other, and never twice in a row in one pair.
    assert [run[0] for run in runs].count("current") == 2
    assert flat == ["current", "v1", "v1", "current", "current", "v1", "v1", "current"]


def test_the_plan_covers_each_scenario_once_per_measurement() -> None:
    steps = compare.plan(["throughput", "latency", "enqueue"], QUICK)
    keys = [(scenario, key) for scenario, key, _, _ in steps]
    assert keys[:3] == [("throughput", "1x500"), ("throughput", "100x50"), ("latency", "idle worker")]
    assert ("enqueue", "one/1p/many") in keys
    assert ("enqueue", "bulk/4p/one_queue") in keys
    assert len(keys) == len(set(keys)) == 3 + 12  # enqueue: 3 modes x 2 producer counts x 2 targets
    one = next(args for scenario, key, _, args in steps if key == "one/4p/many")
    assert one == {"mode": "one", "procs": 4, "target": "many", "n_total": 200}
    assert steps[1][3] == {"queues": 100, "per_queue": 50}


def test_a_scenario_without_a_side_command_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be compared"):
        compare.plan(["scan"], QUICK)


def test_ratios_pair_run_i_with_run_i() -> None:
    entry = compare.compared([100.0, 300.0, 200.0], [100.0, 100.0, 400.0], "higher")
    assert entry["ratio"]["values"] == [1.0, 3.0, 0.5]
    assert entry["ratio"]["median"] == 1.0
    assert (entry["ratio"]["min"], entry["ratio"]["max"]) == (0.5, 3.0)
    assert entry["current"]["median"] == 200.0
    assert entry["rev"]["median"] == 100.0
    assert entry["better"] == "higher"


def test_unpaired_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="unpaired"):
        compare.compared([1.0, 2.0], [1.0], "higher")
    with pytest.raises(ValueError, match="unpaired"):
        compare.compared([], [], "higher")


def test_metrics_of_each_answer() -> None:
    hot = compare.metrics("throughput", {"rate": 400.0, "gaps_ms": [1.0, 2.0, 3.0]})
    assert hot == {"jobs/s": (400.0, "higher"), "gap p50 ms": (2.0, "lower"), "gap p99 ms": (2.98, "lower")}
    assert compare.metrics("throughput", {"rate": 9.0}) == {"jobs/s": (9.0, "higher")}
    lat = compare.metrics("latency", [float(v) for v in range(1, 102)])
    assert lat["p50 ms"] == (51.0, "lower")
    assert compare.metrics("enqueue", 1234.5) == {"jobs/s": (1234.5, "higher")}


def test_the_summary_table_has_a_row_per_figure() -> None:
    results = {
        "compare": {"rev": "main~5", "rev_commit": "0123456789abcdef", "current": {"label": "abc1234"}},
        "config": {"runs": 2},
        "scenarios": {
            "throughput": {
                "100x50": {"jobs/s": compare.compared([1100.0, 1300.0], [1000.0, 1000.0], "higher")},
                "_seconds": 3,
            },
            "latency": {"idle worker": {"p50 ms": compare.compared([5.0, 7.0], [6.0, 7.0], "lower")}},
        },
        "load_before": "1 1 1",
        "load_after": "2 2 2",
        "seconds": 10,
    }
    text = compare.markdown(results)
    assert "| current | main~5 | current / main~5 (paired runs) |" in text
    row = "| throughput 100x50 | jobs/s (higher is better) | 1,200 (1,100-1,300) | 1,000 (1,000-1,000)"
    assert row in text
    assert "| 1.20 (1.10-1.30) |" in text
    assert "| latency idle worker | p50 ms (lower is better) | 6.00 (5.00-7.00) |" in text
    assert "_seconds" not in text

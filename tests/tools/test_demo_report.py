"""The demos' seed statistics (tools/demo_report.py) against hand values."""

import math

from tests.toolload import load_tool

report = load_tool("demo_report")
InlinePool, compare, fmt_mean_std, mean_std, seed_band, verdict = (
    report.InlinePool, report.compare, report.fmt_mean_std, report.mean_std, report.seed_band, report.verdict)


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert math.isclose(mean, 7 / 3) and math.isclose(std, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt_mean_std([1.0, 3.0]) == "2.00 ± 1.41"


def test_compare_marks_only_differences_beyond_the_spread():
    far = compare([95.0, 96.0, 97.0], [90.0, 91.0, 92.0])  # diff 5, stds 1 + 1
    near = compare([92.0, 93.0, 94.0], [90.0, 91.0, 92.0])  # diff 2, stds 1 + 1
    assert far["exceeds"] and math.isclose(far["diff"], 5.0) and math.isclose(far["spread"], 2.0)
    assert not near["exceeds"] and math.isclose(near["diff"], 2.0)
    assert verdict(far) == "**+5.00** (above, spread 2.00)"
    assert verdict(near) == "+2.00 (within ±2.00)"
    assert verdict(compare([1.0, 1.0], [4.0, 4.0])) == "**-3.00** (below, spread 0.00)"


def test_seed_band_uses_the_points_every_seed_has():
    runs = [{"ap": [(10, 1.0), (20, 3.0), (30, 9.0)]}, {"ap": [(10, 3.0), (20, 5.0)]}, {"other": [(10, 0.0)]}]
    assert seed_band(runs[:2], "ap") == ([10, 20], [2.0, 4.0], [math.sqrt(2.0), math.sqrt(2.0)])
    assert seed_band(runs, "ap") == ([], [], [])  # a seed without the curve: no shared point


def test_inline_pool_runs_each_job_when_submitted():
    calls = []
    with InlinePool() as pool:
        done = pool.submit(lambda a, b: calls.append((a, b)) or a + b, 2, 3)
        assert calls == [(2, 3)]
    assert done.result() == 5


def test_demo_methods_and_seeds_defaults_all_duplicates_and_unknown():
    import argparse

    import pytest

    add_demo_arguments, demo_methods_and_seeds = report.add_demo_arguments, report.demo_methods_and_seeds

    labels = {"vanilla": "vanilla", "kd": "KD", "dkd": "DKD"}
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser, labels, ("vanilla", "kd"))

    def chosen(*argv):
        return demo_methods_and_seeds(parser, parser.parse_args(list(argv)), labels, ("vanilla", "kd"), ("vanilla",))

    assert chosen() == (["vanilla", "kd"], [0, 1, 2])
    assert chosen("--quick") == (["vanilla"], [0, 1])
    assert chosen("--methods", "all", "--seeds", "4") == (["vanilla", "kd", "dkd"], [4])
    assert chosen("--methods", "dkd", "kd", "dkd")[0] == ["dkd", "kd"]
    with pytest.raises(SystemExit):
        chosen("--methods", "kd", "nope")


def test_demo_pool_is_inline_for_one_job_and_spawned_processes_otherwise():
    from concurrent.futures import ProcessPoolExecutor

    demo_pool = report.demo_pool

    assert isinstance(demo_pool(1), InlinePool) and isinstance(demo_pool(0), InlinePool)
    with demo_pool(2) as pool:
        assert isinstance(pool, ProcessPoolExecutor) and pool._mp_context.get_start_method() == "spawn"

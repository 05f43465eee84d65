"""The dynamic top-k schedule."""

import pytest

from deepkd_det.core.topk import TopKSchedule


def test_linear_schedule_values():
    s = TopKSchedule(99, mode="linear", k_start=10, k_end=99, start=0.1, end=0.6)
    assert s.k_at(0.0) == 10 and s.k_at(0.1) == 10
    assert s.k_at(0.35) == round(10 + 0.5 * 89)  # half-way: 54.5 -> 54 (round half to even)
    assert s.k_at(0.6) == 99 and s.k_at(1.0) == 99
    assert s.k_at(-1) == 10 and s.k_at(2) == 99  # clamped
    values = [s.k_at(i / 100) for i in range(101)]
    assert values == sorted(values), "K never decreases"


def test_defaults_follow_the_paper_description():
    s = TopKSchedule(80)  # COCO: 81 classes incl. background -> 80 non-target
    assert s.mode == "linear" and s.k_start == 8 and s.k_end == 80
    assert s.k_at(0.0) == 8 and s.k_at(0.6) == 80
    assert s.topk_arg(0.9) is None  # all classes: no mask at all
    assert s.topk_arg(0.0) == 8


def test_step_and_constant_and_off():
    s = TopKSchedule(99, mode="step", k_start=5, phases=[(0.25, 20), (0.5, 50), (0.75, 99)])
    assert [s.k_at(p) for p in (0.0, 0.2, 0.25, 0.6, 0.75, 1.0)] == [5, 5, 20, 50, 99, 99]
    assert TopKSchedule(99, mode="constant", k_start=7).k_at(0.9) == 7
    assert TopKSchedule(99, mode="off", k_start=7).k_at(0.0) == 99


def test_state_dict_round_trip():
    s = TopKSchedule(99, mode="step", k_start=5, phases=[(0.5, 50)])
    s(0.7)
    t = TopKSchedule(99)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert t.last_progress == 0.7 and t.k_at(0.6) == 50


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_start=0), "out of range"),
        (dict(k_end=100), "out of range"),
        (dict(k_start=50, k_end=20), "k_start=50 > k_end=20"),
        (dict(start=0.7, end=0.5), "start <= end"),
        (dict(end=1.5), "start <= end"),
        (dict(mode="cosine"), "mode"),
        (dict(mode="step"), "at least one phase"),
        (dict(mode="step", phases=[(0.5, 10), (0.4, 20)]), "strictly increasing"),
        (dict(mode="step", phases=[(0.2, 30), (0.4, 20)]), "must not decrease"),
        (dict(mode="step", phases=[(0.2, 300)]), "out of range"),
    ],
)
def test_invalid_schedules_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKSchedule(99, **kwargs)


def test_default_first_k_is_at_least_two():
    # NCKD over one kept class is identically zero: the default never starts at K = 1 when there
    # are two or more non-target classes (10% of them otherwise, and K = 1 when that is all).
    assert [TopKSchedule(n).k_start for n in (1, 2, 3, 20, 99)] == [1, 2, 2, 2, 10]
    assert TopKSchedule(3).k_at(0.0) == 2

"""The replay / duplicate window, against a plain set of everything seen."""

import random

from gelf.seen import SeenFilter


def test_first_time_only():
    seen = SeenFilter()
    assert seen.fresh(1, 100) and not seen.fresh(1, 100)
    assert seen.fresh(2, 100)  # another origin has its own window


def test_reordering_inside_the_window_is_accepted_once():
    seen = SeenFilter(window=64)
    order = list(range(1000, 1064))
    random.Random(7).shuffle(order)
    assert all(seen.fresh(5, seq) for seq in order)
    assert not any(seen.fresh(5, seq) for seq in order)


def test_older_than_the_window_is_refused():
    seen = SeenFilter(window=64)
    assert seen.fresh(5, 10_000)
    assert not seen.fresh(5, 10_000 - 64)
    assert seen.fresh(5, 10_000 - 63)


def test_matches_a_reference_set_on_random_traffic():
    seen = SeenFilter(window=128)
    rng = random.Random(1)
    delivered = set()
    top = 0
    for _ in range(20_000):
        seq = max(0, top + rng.randint(-150, 20))
        fresh = seen.fresh(9, seq)
        expected = seq not in delivered and seq > top - 128
        assert fresh == expected, seq
        if fresh:
            delivered.add(seq)
            top = max(top, seq)


def test_origins_are_bounded():
    seen = SeenFilter(max_origins=8)
    for origin in range(100):
        seen.fresh(origin, 1)
    assert len(seen._origins) == 8

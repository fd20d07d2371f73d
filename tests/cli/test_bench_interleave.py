"""The benchmarks' round-robin timer: every arm is timed `repeats` times, and each arm follows every other arm
about equally often (what one call leaves behind, a cold cache or freed memory, weighs on the next call)."""

from __future__ import annotations

from collections import Counter

from peftray.bench._tuners_setup import time_interleaved


def test_each_arm_follows_every_other_arm_equally_often():
    order: list[str] = []
    arms = ["base", "ours", "theirs", "pytorch"]
    fns = {name: (lambda name=name: order.append(name)) for name in arms}
    times = time_interleaved(fns, repeats=30, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {name: 30 for name in arms}
    assert all(t >= 0 for ts in times.values() for t in ts)
    timed = order[len(arms):]  # after the warmup round
    follows = Counter(zip(timed, timed[1:]))
    pairs = {(a, b) for a in arms for b in arms if a != b}
    assert set(follows) <= pairs  # never the same arm twice in a row
    assert set(follows) == pairs and max(follows.values()) <= 3 * min(follows.values())

"""Progress lines: durations, rate and ETA from a fake clock, and how often a line is due."""

import math

from alexnet_jax import progress


def test_format_duration():
    assert progress.format_duration(0) == "0m00s"
    assert progress.format_duration(725.9) == "12m05s"
    assert progress.format_duration(3 * 3600 + 129) == "3h02m09s"
    assert progress.format_duration(-5) == "0m00s"
    assert progress.format_duration(math.inf) == "?"


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_and_eta_count_only_work_done_since_the_start():
    clock = _Clock()
    p = progress.Progress(1000, unit="images", done=400, every_seconds=10, clock=clock)
    assert p.eta_seconds == math.inf
    clock.now += 20
    line = p.update(100)  # 100 images in 20 s (the 400 done before do not count): 5/s.
    assert line == "500/1000 images (50%), 5.0 images/s, ETA 1m40s"
    assert p.eta_seconds == 100


def test_a_line_is_due_every_few_seconds_at_the_end_or_when_forced():
    clock = _Clock()
    p = progress.Progress(30, unit="steps", every_seconds=10, clock=clock)
    assert p.update(1) is not None  # The first update shows at once.
    clock.now += 5
    assert p.update(1) is None
    assert p.update(0, prefix="x: ", force=True).startswith("x: 2/30 steps")
    clock.now += 11
    assert p.update(1) is not None
    clock.now += 1
    assert p.update(27) is not None  # Done: always shown.

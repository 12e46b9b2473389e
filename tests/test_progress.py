"""Progress lines (nanogpt_jax/progress.py): by the clock, not per batch; the duration format."""

import logging

from nanogpt_jax import progress


def test_progress_lines_come_by_the_clock_not_per_batch(caplog):
    now = [100.0]
    lines_of = progress.Progress("hellaswag", total=10042, unit="examples", clock=lambda: now[0])
    lines = []
    for _ in range(40):  # a batch of 8 every 1.5 s: a line every PROGRESS_SECONDS, not every batch
        now[0] += 1.5
        lines.append(lines_of.update(8))
    logged = [line for line in lines if line]
    assert progress.PROGRESS_SECONDS == 10 and [i for i, line in enumerate(lines) if line] == [6, 13, 20, 27, 34]
    assert logged[0] == "hellaswag: 56/10,042 examples, 5.3 examples/s, eta 31m12s"  # 56 in 10.5 s
    with caplog.at_level(logging.INFO):
        now[0] += 60
        lines_of.update(8, "bfloat16")
    assert "hellaswag: 328/10,042 examples" in caplog.text and caplog.text.rstrip().endswith("(bfloat16)")


def test_durations_read_as_hours_minutes_or_seconds():
    assert [progress.format_duration(s) for s in (0, 42.9, 185, 3720, 90061)] == ["0s", "42s", "3m05s", "1h02m",
                                                                                   "25h01m"]

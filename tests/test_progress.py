"""Progress reporting: a bar on a terminal, timed log lines elsewhere (vidit/progress.py)."""
import io
import logging

from vidit import progress


def test_log_lines_report_count_rate_eta_and_postfix(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 40.0, 60.0, 80.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.LogLines(total=100, initial=0, desc="train", unit="step", every_s=30.0)
    with caplog.at_level(logging.INFO, logger="vidit"):
        bar.update(10)  # t=10: not yet 30 s since the start
        bar.set_postfix(loss="0.5")
        bar.update(10)  # t=20
        bar.update(20)  # t=40: a line
        bar.update(60)  # t=60: the last step always logs
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train: 40/100 steps (40%), 1.00 steps/s, 1m00s left, loss=0.5",
                     "train: 100/100 steps (100%), 1.67 steps/s, 0m00s left, loss=0.5"]


def test_bar_is_log_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # not a TTY
    assert isinstance(progress.bar(10, desc="x"), progress.LogLines)
    assert not isinstance(progress.bar(10, desc="x", enabled=False), progress.LogLines)

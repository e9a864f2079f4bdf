"""Logs a person can read: progress off a terminal is one line per interval, never one per step, and the
flows' task logs say DVC's repeated lines once."""

import logging

import pytest

from dddm.progress import IntervalLog, progress
from flows.dvcrun import CondensedLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    logger = logging.getLogger("test_logs")
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    yield logger, handler.lines
    logger.removeHandler(handler)


def test_off_a_terminal_progress_is_one_line_per_interval_with_the_loop_s_figures(lines):
    logger, out = lines
    clock = Clock()
    bar = IntervalLog(1740, "train edm", unit="step", interval=20, logger=logger, clock=clock)
    for step in range(1740):  # 0.1 s per step: 174 s in all
        clock.now += 0.1
        bar.update()
        bar.set_postfix(epoch=f"{step // 29 + 1}/60", loss="3.2100", img_s="640")
    bar.close()
    assert len(out) == 9  # at 20, 40, ..., 160 s, and the end
    assert out[0] == "train edm: 200/1740 step, epoch 7/60, loss 3.2100, img_s 640, 10 step/s, ETA 2 min 34 s"
    assert out[-1] == "train edm: 1740/1740 step, epoch 60/60, loss 3.2100, img_s 640, done in 2 min 54 s"


def test_a_slow_loop_says_about_ten_lines_and_a_long_one_one_per_ten_minutes(lines):
    logger, out = lines
    clock = Clock()
    with IntervalLog(1000, "train", interval=20, logger=logger, clock=clock) as bar:
        for _ in range(1000):  # 1 s per step: 50 intervals of 20 s, but a line per 100 steps
            clock.now += 1
            bar.update()
    assert [line.split(",")[0] for line in out] == [f"train: {n}/1000 it" for n in range(100, 1001, 100)]
    out.clear()
    with IntervalLog(100_000, "train", interval=20, logger=logger, clock=clock) as bar:
        for _ in range(3600):  # an hour of a loop whose tenth takes 10,000 s
            clock.now += 1
            bar.update()
    assert len(out) == 6  # at 10, 20, ..., 60 minutes (the last step was one of them: no line on close)


def test_a_resumed_loop_counts_its_rate_from_where_it_resumed(lines):
    logger, out = lines
    clock = Clock()
    with IntervalLog(100, "train", initial=50, interval=10, logger=logger, clock=clock) as bar:
        for _ in range(20):
            clock.now += 1
            bar.update()
    assert out == ["train: 60/100 it, 1 it/s, ETA 40 s", "train: 70/100 it, 1 it/s, ETA 30 s"]


def test_a_loop_that_did_nothing_says_nothing(lines):
    logger, out = lines
    IntervalLog(10, "sampling", logger=logger, clock=Clock()).close()
    assert out == []


def test_progress_is_a_log_off_a_terminal_and_silent_when_disabled():
    # pytest captures stderr, so it is not a terminal here
    assert isinstance(progress(10, "x"), IntervalLog)
    assert not isinstance(progress(10, "x", disable=True), IntervalLog)


def test_the_interval_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("DDDM_PROGRESS_INTERVAL_S", "5")
    assert IntervalLog(1, "x").interval == 5
    monkeypatch.setenv("DDDM_PROGRESS_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="DDDM_PROGRESS_INTERVAL_S: 'soon'"):
        IntervalLog(1, "x")


def test_dvc_s_skips_are_one_line_and_its_advice_is_dropped(lines):
    logger, out = lines
    log = CondensedLog(logger)
    for text in ["Stage 'check' didn't change, skipping", "Stage 'prepare' didn't change, skipping",
                 "Running stage 'train@edm':", "> torchrun ...", "Updating lock file 'dvc.lock'",
                 "To track the changes with git, run:", "\tgit add dvc.lock", "To enable auto staging, run:",
                 "\tdvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.",
                 "Stage 'sample@edm' didn't change, skipping"]:
        log.line(text)
    log.flush()
    assert out == ["unchanged, not run: check, prepare", "Running stage 'train@edm':", "> torchrun ...",
                   "Updating lock file 'dvc.lock'", "unchanged, not run: sample@edm"]

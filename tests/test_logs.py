"""Logs a person can read: progress off a terminal is one line per interval, never one per step, and the
flows' task logs say DVC's repeated lines once."""

import logging
import subprocess

import pytest

from conftest import NO_MLFLOW_MODEL, run_env, stage_command, tiny_params, write_params
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


def test_a_loop_that_did_nothing_or_ran_within_the_interval_says_nothing(lines):
    logger, out = lines
    IntervalLog(10, "sampling", logger=logger, clock=Clock()).close()
    clock = Clock()
    with IntervalLog(10, "sampling", interval=30, logger=logger, clock=clock) as bar:
        for _ in range(10):  # 29 s in all: the stage's own lines say it ran
            clock.now += 2.9
            bar.update()
    assert out == []


def test_progress_is_a_log_off_a_terminal_and_silent_when_disabled():
    # pytest captures stderr, so it is not a terminal here
    assert isinstance(progress(10, "x"), IntervalLog)
    assert not isinstance(progress(10, "x", disable=True), IntervalLog)


def test_the_interval_is_30_s_or_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("DDDM_PROGRESS_INTERVAL_S", raising=False)
    assert IntervalLog(1, "x").interval == 30
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
                   "unchanged, not run: sample@edm"]


@pytest.mark.slow
def test_the_train_stage_says_no_more_at_6_epochs_than_at_2(repo_copy):
    """The train stage is the one whose work grows with the epochs (the learning curve's points aside: one line
    each, train.eval_every 0 here): its own log lines are as many at 6 epochs as at 2, with progress at its most
    talkative (a line per tenth of the loop, DDDM_PROGRESS_INTERVAL_S=0), so a flow's log does not grow with them."""
    def run(stage: str) -> str:
        done = subprocess.run(stage_command(repo_copy, stage), cwd=repo_copy, env=run_env(DDDM_PROGRESS_INTERVAL_S="0"),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    said = {}
    for epochs in (2, 6):
        write_params(repo_copy, tiny_params(methods=["udddm"], finetune={"methods": []},
                                            train={"epochs": epochs, "batch_size": 64, "eval_every": 0},
                                            tracking=NO_MLFLOW_MODEL))
        if not said:
            run("prepare")
        said[epochs] = [line for line in run("train@udddm").splitlines() if " dddm." in line]  # not MLflow's
    assert len(said[6]) == len(said[2]), (said[2], said[6])
    assert sum("train udddm: " in line for line in said[6]) == 10  # 9 tenths and the end

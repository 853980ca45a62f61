"""The callbacks around the loop (tasks/engine/callbacks.py), each against a fake trainer:
best.pt before last.pt and the log line after both, an interrupt leaves the log no ahead of the
checkpoints, evaluation every N epochs, the guard's checks, early stopping, curves at most every
15 s, the compile cache, the console / TensorBoard line."""
import json
import math
from pathlib import Path

import pytest
import torch

from tasks.engine import callbacks, checkpoint
from tasks.engine.callbacks import Checkpoints, CompileCache, Curves, EarlyStopping, Evaluation, GuardChecks, Logging
from tasks.engine.checkpoint import CheckpointWriter
from tasks.engine.logging import MetricsLog
from tests.engine_fakes import Tiny, toy_config


class FakeTrainer:
    def __init__(self, epochs: int = 3, start_epoch: int = 0) -> None:
        self.epochs, self.start_epoch, self.main, self.main_metric = epochs, start_epoch, True, "acc"
        self.best, self.records, self.saved_epoch, self.best_saved_epoch = None, [], None, None
        self.best_epoch, self.stopped_early, self.stop_reason = None, None, None
        self.lines: list[str] = []
        self.console = self.lines.append
        self.evaluated: list[bool] = []

    def state_dict(self, epoch, record):
        return {"epoch": epoch, "w": torch.ones(2)}

    def evaluate(self, final=False):
        self.evaluated.append(final)
        return {"acc": 0.5}


def _logged(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    return [json.loads(x)["epoch"] for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def saves(tmp_path, monkeypatch):
    """Each checkpoint write as (file name, epochs in metrics.jsonl at that moment)."""
    events = []
    real = checkpoint.atomic_save

    def save(obj, path):
        events.append((Path(path).name, _logged(tmp_path)))
        return real(obj, path)
    monkeypatch.setattr(checkpoint, "atomic_save", save)
    return events


def _checkpoints(tmp_path, **kw):
    return Checkpoints(CheckpointWriter(), MetricsLog(tmp_path / "metrics.jsonl"), tmp_path, **kw)


def test_best_before_last_and_the_log_line_only_after_both(tmp_path, saves):
    t, cb = FakeTrainer(), _checkpoints(tmp_path)
    cb.before_fit(t)
    cb.after_epoch(t, 0, {"epoch": 1, "val_acc": 0.5})
    cb.close(t)  # waits for the writer
    assert saves == [("best.pt", []), ("last.pt", [])]  # the line was not written before either file
    assert _logged(tmp_path) == [1] and (t.best, t.saved_epoch, t.best_saved_epoch) == (0.5, 1, 1)
    cb.after_epoch(t, 1, {"epoch": 2, "val_acc": 0.4})  # worse: last.pt only
    cb.close(t)
    assert saves[2:] == [("last.pt", [1])] and _logged(tmp_path) == [1, 2]
    assert (t.best, t.saved_epoch, t.best_saved_epoch) == (0.5, 2, 1)
    assert [r["epoch"] for r in t.records] == [1, 2]


def test_an_interrupt_leaves_the_log_no_ahead_of_the_checkpoints(tmp_path, saves):
    t, cb = FakeTrainer(epochs=6), _checkpoints(tmp_path, save_every=2)
    cb.before_fit(t)
    for epoch, acc in enumerate([0.5, 0.4, 0.3]):  # 1: best.pt; 2: last.pt; 3: a line, no checkpoint
        cb.after_epoch(t, epoch, {"epoch": epoch + 1, "val_acc": acc})
    cb.close(t)
    assert [name for name, _ in saves] == ["best.pt", "last.pt"] and _logged(tmp_path) == [1, 2, 3]
    cb.on_interrupt(t)
    assert _logged(tmp_path) == [1, 2] and [r["epoch"] for r in t.records] == [1, 2]

    t2, cb2 = FakeTrainer(epochs=6), _checkpoints(tmp_path / "b", save_every=4)
    cb2.before_fit(t2)
    cb2.after_epoch(t2, 0, {"epoch": 1, "val_acc": 0.5})  # best.pt only
    cb2.after_epoch(t2, 1, {"epoch": 2, "val_acc": 0.1})  # nothing
    cb2.on_interrupt(t2)  # best.pt holds epoch 1: its line stays
    assert _logged(tmp_path / "b") == [1] and t2.saved_epoch is None and t2.best_saved_epoch == 1


def test_a_fresh_run_drops_an_old_log_and_a_resumed_one_reads_it(tmp_path):
    MetricsLog(tmp_path / "metrics.jsonl").append({"epoch": 1, "train_time_s": 2.0})
    resumed = FakeTrainer(start_epoch=1)
    _checkpoints(tmp_path).before_fit(resumed)
    assert [r["epoch"] for r in resumed.records] == [1]
    fresh = FakeTrainer()
    _checkpoints(tmp_path).before_fit(fresh)
    assert fresh.records == [] and _logged(tmp_path) == []


def test_other_ranks_track_the_best_and_write_nothing(tmp_path):
    t, cb = FakeTrainer(), _checkpoints(tmp_path / "r1", main=False)
    cb.before_fit(t)
    cb.after_epoch(t, 2, {"epoch": 3, "val_acc": 0.7})
    cb.close(t)
    assert t.best == 0.7 and t.records == [] and not (tmp_path / "r1").exists()


def test_evaluation_every_n_epochs_and_at_the_end():
    t, cb = FakeTrainer(epochs=5), Evaluation(every=2)
    records = [{"epoch": e + 1} for e in range(5)]
    for e, r in enumerate(records):
        cb.after_epoch(t, e, r)
    assert t.evaluated == [False, False, True]  # epochs 2, 4 and the last, which writes the pictures
    assert [("val_acc" in r, "eval_time_s" in r) for r in records] == [(False, False), (True, True), (False, False),
                                                                       (True, True), (True, True)]


def test_guard_checks_the_state_after_training_and_the_metric_when_there_is_one():
    class Guard:
        calls = []

        def check_state(self, state, epoch):
            self.calls.append(("state", sorted(state), epoch))

        def check_metric(self, epoch, name, value, steps):
            self.calls.append(("metric", epoch, name, value, steps))

    t = FakeTrainer()
    t.guard, t.model, t.ema, t.steps_per_epoch = Guard(), Tiny(), None, 4
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.1)
    cb = GuardChecks()
    cb.after_train_epoch(t, 0, None)
    cb.after_epoch(t, 0, {"epoch": 1})  # not evaluated: nothing to check
    cb.after_epoch(t, 1, {"epoch": 2, "val_acc": 0.0})
    assert Guard.calls == [("state", ["ema", "model", "optimizer"], 0), ("metric", 1, "acc", 0.0, 8)]


def test_early_stopping_makes_its_epoch_the_last_for_the_checkpoints_and_the_pictures(tmp_path, saves):
    """Patience 2 before Checkpoints (save_every 5): best at epoch 1; epoch 2 one epoch old, epoch 3
    two: the stop. Epoch 3 then writes last.pt as a last epoch does; its extra evaluation (the
    pictures) leaves the global RNG as it found it."""
    class Drawing(FakeTrainer):
        def evaluate(self, final=False):
            torch.rand(3)  # an evaluation that draws from the global RNG
            return super().evaluate(final)

    t, stop, cb = Drawing(epochs=10), EarlyStopping(2), _checkpoints(tmp_path, save_every=5)
    cb.before_fit(t)
    for epoch, acc in enumerate([0.5, 0.5, 0.4]):  # equal is no improvement (as for best.pt)
        record = {"epoch": epoch + 1, "val_acc": acc, "eval_time_s": 1.0}
        rng = torch.get_rng_state()
        stop.after_epoch(t, epoch, record)
        assert callbacks._last(t, epoch) == (epoch == 2)
        cb.after_epoch(t, epoch, record)
    cb.close(t)
    assert torch.equal(torch.get_rng_state(), rng) and t.evaluated == [True]
    assert (t.stopped_early, t.best, t.best_epoch) == (3, 0.5, 1) and record["eval_time_s"] > 1.0
    assert t.stop_reason == "early stop at epoch 3: val_acc has not improved on 0.5 (epoch 1) for 2 epochs " \
                           "(train.patience=2)"
    assert [name for name, _ in saves] == ["best.pt", "last.pt"] and _logged(tmp_path) == [1, 2, 3]
    assert t.saved_epoch == 3 and t.best_saved_epoch == 1


def test_early_stopping_waits_for_an_evaluation_and_is_off_at_none():
    t, stop = FakeTrainer(epochs=10), EarlyStopping(1)
    t.best, t.best_epoch = 0.5, 1
    stop.after_epoch(t, 1, {"epoch": 2})  # not evaluated: nothing to judge
    assert t.stopped_early is None
    EarlyStopping(None).after_epoch(t, 1, {"epoch": 2, "val_acc": 0.1})
    assert t.stopped_early is None and t.evaluated == []
    t.start_epoch, t.best_epoch = 4, None  # resumed from a checkpoint that predates best_epoch: count from it
    stop.after_epoch(t, 4, {"epoch": 5, "val_acc": 0.1})
    assert t.stopped_early == 5 and "on 0.5 (epoch 4 or earlier) for 1 epoch" in t.stop_reason
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"^train.patience=.*1 or more \(null: off\)"):
            EarlyStopping(bad)


def test_curves_at_most_every_15_s_at_the_end_and_after_an_interrupt(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(callbacks, "plot_curves", lambda records, path, **kw: drawn.append(
        [r["epoch"] for r in records]) or Path(path).write_text("png"))
    t, cb = FakeTrainer(epochs=3), Curves(tmp_path / "curves.png", "acc")
    cb.before_fit(t)
    for e in range(3):
        t.records.append({"epoch": e + 1})
        cb.after_epoch(t, e, t.records[-1])
    assert drawn == [[1], [1, 2, 3]]  # the first, then not within 15 s, then the last
    cb.on_interrupt(t)  # the log kept every epoch: the picture stays
    assert len(drawn) == 2
    t.records = t.records[:1]  # an interrupt dropped epochs 2 and 3
    cb.on_interrupt(t)
    assert drawn[-1] == [1]
    t.records = []
    cb.on_interrupt(t)
    assert not (tmp_path / "curves.png").exists()


def test_compile_cache_refuses_files_it_would_overwrite_and_writes_after_the_first_epoch(tmp_path, monkeypatch):
    messages = []
    with pytest.raises(ValueError, match="is a folder"):
        CompileCache(tmp_path, messages.append)
    (tmp_path / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ValueError, match="is a PNG image, not a torch.compile cache"):
        CompileCache(tmp_path / "pic.png", messages.append)
    assert CompileCache.from_config(toy_config().train, messages.append) is None
    with pytest.raises(ValueError, match="needs train.compile=true"):
        CompileCache.from_config(toy_config(train={"compile_cache": str(tmp_path / "c")}).train, messages.append)

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    cache = CompileCache(tmp_path / "c", messages.append)
    assert "does not exist yet" in messages[-1]
    t = FakeTrainer(start_epoch=1)
    cache.after_train_epoch(t, 2, None)  # not this run's first epoch
    assert not (tmp_path / "c").exists()
    cache.after_train_epoch(t, 1, None)
    assert (tmp_path / "c").read_bytes() == b"artifacts"

    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    again = CompileCache(tmp_path / "c", messages.append)
    assert loaded == [b"artifacts"] and again.out is None  # a file that loaded is never rewritten


def test_logging_prints_one_line_and_writes_tensorboard():
    class TensorBoard:
        records, closed = [], False

        def append(self, record):
            self.records.append(record)

        def close(self):
            TensorBoard.closed = True

    t, tb = FakeTrainer(epochs=4), TensorBoard()
    cb = Logging(tb)
    record = {"epoch": 2, "train_loss": 0.25, "val_acc": 0.5, "train_img_per_s": 100.0, "train_time_s": 1.5,
              "lr": math.pi}
    cb.after_epoch(t, 1, record)
    cb.close(t)
    assert t.lines == ["epoch 2/4  train_loss 0.25  val_acc 0.5  train_img_per_s 100  train_time_s 1.5"]
    assert tb.records == [record] and TensorBoard.closed

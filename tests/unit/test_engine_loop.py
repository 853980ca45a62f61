"""The Trainer's loop (tasks/engine/loop.py) with fakes: the hooks in order, the epoch record,
no host read between log points, an interrupt, resume continuing the schedule exactly."""
import json

import pytest
import torch

from tasks.engine import callbacks
from tasks.engine.callbacks import Callback, Checkpoints, Curves, Evaluation, GuardChecks, Logging
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.step import EagerStep
from tests.engine_fakes import Batches, make_trainer, metric_sequence, toy_config


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    monkeypatch.setattr(callbacks, "plot_curves", lambda records, path, **kw: None)  # matplotlib: slow


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def before_fit(self, trainer):
        self.calls.append("before_fit")

    def after_train_epoch(self, trainer, epoch, result):
        self.calls.append(("after_train_epoch", epoch))

    def after_epoch(self, trainer, epoch, record):
        self.calls.append(("after_epoch", epoch, "val_acc" in record))

    def on_interrupt(self, trainer):
        self.calls.append("on_interrupt")

    def close(self, trainer):
        self.calls.append("close")


class Interrupting(Batches):
    """Ctrl-C as epoch ``at`` starts."""

    def __init__(self, at: int, **kw):
        super().__init__(**kw)
        self.at = at

    def __iter__(self):
        if self.epochs and self.epochs[-1] == self.at:
            raise KeyboardInterrupt
        return super().__iter__()


def _epochs(folder):
    return [json.loads(x)["epoch"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fit_runs_each_epoch_through_the_callbacks_and_records_it(tmp_path):
    batches = Batches(n=4, batch=3)
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"eval_every": 2}), batches=batches)
    assert [type(c) for c in trainer.callbacks] == [Evaluation, GuardChecks, Checkpoints, Curves, Logging]
    rec = Recorder()
    trainer.callbacks.append(rec)
    final = trainer.fit()
    assert rec.calls == ["before_fit", ("after_train_epoch", 0), ("after_epoch", 0, False), ("after_train_epoch", 1),
                         ("after_epoch", 1, True), ("after_train_epoch", 2), ("after_epoch", 2, True), "close"]
    assert batches.epochs == [0, 1, 2] and trainer.current_epoch == 3
    first, second, third = trainer.records
    assert {"epoch", "lr", "train_loss", "train_loss_mse", "train_loss_l2", "train_images", "train_time_s",
            "train_time_total_s", "train_img_per_s"} <= set(first) and "val_acc" not in first
    assert "world_size" not in first and first["train_images"] == 12
    assert third["train_time_total_s"] == pytest.approx(sum(r["train_time_s"] for r in trainer.records))
    assert {"val_acc", "eval_time_s"} <= set(second)
    assert final["epoch"] == 3 and final["best_acc"] == 0.5 and trainer.best == 0.5
    assert _epochs(tmp_path) == [1, 2, 3] and load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert trainer.saved_epoch == 3 and trainer.best_saved_epoch == 2


def test_the_epoch_loss_is_the_mean_over_its_steps(tmp_path):
    batches = Batches(n=5)
    trainer = make_trainer(tmp_path, cfg=toy_config(optim={"lr": 0.0}), batches=batches)  # lr 0: nothing moves
    result = trainer.train_one_epoch(0)
    with torch.no_grad():
        terms = [trainer.model(x, y) for x, y in batches]
    assert result.images == 15 and result.extra == {}
    assert result.losses["loss"] == pytest.approx(sum(sum(t.values()).item() for t in terms) / 5, rel=1e-6)
    assert result.losses["loss_mse"] == pytest.approx(sum(t["mse"].item() for t in terms) / 5, rel=1e-6)
    assert trainer.scheduler.last_epoch == 5  # one schedule step per optimizer step


def test_the_host_reads_device_values_at_log_points_only(tmp_path, monkeypatch):
    """Twice the steps between log points, the same number of host reads: nothing per step."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            reads["n"] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def epoch_reads(steps):
        trainer = make_trainer(tmp_path / str(steps), cfg=toy_config(optim={"clip_grad_norm": 1.0},
                                                                     train={"log_every": 1000}),
                               batches=Batches(n=steps))
        trainer.train_one_epoch(0)  # warm-up: the guard's first-step state
        reads["n"] = 0
        trainer.train_one_epoch(1)
        return reads["n"]
    assert epoch_reads(4) == epoch_reads(8)


def test_an_interrupt_leaves_the_log_no_ahead_of_the_checkpoints(tmp_path):
    # save_every 3: epoch 1 writes best.pt, epoch 2 only its log line; Ctrl-C as epoch 3 starts
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 4, "save_every": 3}),
                           batches=Interrupting(at=2))
    rec = Recorder()
    trainer.callbacks.append(rec)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert rec.calls[-2:] == ["on_interrupt", "close"]
    assert _epochs(tmp_path) == [1] and [r["epoch"] for r in trainer.records] == [1]
    assert (trainer.saved_epoch, trainer.best_saved_epoch, trainer.current_epoch) == (None, 1, 3)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and not (tmp_path / "last.pt").exists()


def test_resume_continues_the_schedule_and_the_weights_exactly(tmp_path):
    cfg = toy_config(optim={"schedule": "cosine"}, train={"epochs": 4})
    full = make_trainer(tmp_path / "full", cfg=cfg)
    full.fit()
    stopped = make_trainer(tmp_path / "run", cfg=cfg, batches=Interrupting(at=2))
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    assert stopped.saved_epoch == 2
    resumed = make_trainer(tmp_path / "run", cfg=cfg)
    resumed.resume(tmp_path / "run" / "last.pt")
    assert resumed.start_epoch == 2 and resumed.scheduler.last_epoch == 8
    resumed.fit()
    assert resumed.scheduler.last_epoch == full.scheduler.last_epoch == 16
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert [r["lr"] for r in resumed.records] == [r["lr"] for r in full.records]
    assert _epochs(tmp_path / "run") == [1, 2, 3, 4]

    longer = make_trainer(tmp_path / "longer", cfg=toy_config(optim={"schedule": "cosine"}, train={"epochs": 6}))
    longer.resume(tmp_path / "run" / "last.pt")  # more epochs: the schedule is rebuilt and moved to step 16
    fresh = make_trainer(tmp_path / "fresh", cfg=toy_config(optim={"schedule": "cosine"}, train={"epochs": 6}))
    for _ in range(16):
        fresh.optimizer.step()
        fresh.scheduler.step()
    assert longer.scheduler.last_epoch == 16
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])
    with pytest.raises(ValueError, match=r"optim.lr 0.1 in the checkpoint, 0.2 in this command"):
        make_trainer(tmp_path / "other", cfg=toy_config(optim={"schedule": "cosine", "lr": 0.2},
                                                        train={"epochs": 4})).resume(tmp_path / "run" / "last.pt")


def test_a_cpu_trainer_takes_eager_steps_even_with_cuda_graph_on(tmp_path):
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"cuda_graph": True}))
    assert type(trainer.step) is EagerStep and trainer.graphed is None and trainer.train_model is trainer.model


def test_the_ema_is_what_evaluation_and_checkpoints_see(tmp_path):
    seen = []

    def evaluate(model, final):
        seen.append(model)
        return {"acc": 0.5}
    trainer = make_trainer(tmp_path, cfg=toy_config(optim={"ema": True, "ema_decay": 0.9}, train={"epochs": 1}),
                           evaluate=evaluate)
    trainer.fit()
    assert seen == [trainer.ema.module] and trainer.eval_model is trainer.ema.module
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["ema_steps"] == trainer.ema.updates == 4
    assert {"format", "task", "config", "model", "ema", "optimizer", "scheduler", "grad_scaler", "epoch",
            "steps_per_epoch", "world_size", "metrics", "best", "rng", "meta"} <= set(ckpt)


def test_a_finished_run_resumed_evaluates_and_reports(tmp_path):
    evaluate = metric_sequence(0.25, 0.75)
    done = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 1}), evaluate=evaluate)
    done.fit()
    again = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 1}), evaluate=evaluate)
    again.resume(tmp_path / "last.pt")
    record = again.fit()
    assert record == {"epoch": 1, "val_acc": 0.75, "best_acc": 0.25} and evaluate.calls == [True, True]


@pytest.mark.parametrize("seconds, expected", [(1e-9, [2, 4, 6]), (0.0, [])])
def test_without_a_terminal_a_progress_line_comes_at_log_points_every_log_seconds(tmp_path, seconds, expected):
    """Output to a file: the bar is off, so a line (step, loss, img/s, ETA) at the log points
    once train.log_seconds have passed; never after the epoch's last step (its own line follows)."""
    from tasks.engine.loop import Trainer
    from tests.engine_fakes import Tiny

    lines = []
    cfg = toy_config(train={"log_every": 2, "log_seconds": seconds, "epochs": 2})
    trainer = Trainer("toy", cfg, Tiny(), Batches(n=8), evaluate=metric_sequence(0.5), main_metric="acc",
                      output=tmp_path, device=torch.device("cpu"), console=lines.append, quiet=False)
    trainer.train_one_epoch(0)  # pytest's stderr is not a terminal: the bar is off
    progress = [line for line in lines if " step " in line]
    assert [int(line.split("step ")[1].split("/")[0]) for line in progress] == expected
    for line in progress:
        assert line.startswith("epoch 1/2  step ") and "/8  loss " in line and " img/s  ETA " in line

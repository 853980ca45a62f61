"""The Trainer's loop (tasks/engine/loop.py) with fakes: the hooks in order, the epoch record,
no host read between log points, an interrupt, resume continuing the schedule exactly."""
import json

import pytest
import torch

from tasks.engine import callbacks
from tasks.engine.callbacks import Callback, Checkpoints, Curves, EarlyStopping, Evaluation, GuardChecks, Logging
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.loop import NonFiniteLossError
from tasks.engine.step import EagerStep
from tests.engine_fakes import Batches, make_trainer, merged, metric_sequence, toy_config


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
    assert [type(c) for c in trainer.callbacks] == [Evaluation, GuardChecks, EarlyStopping, Checkpoints, Curves,
                                                    Logging]
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


# ----------------------------------------------------------------------------- train.accumulate

@pytest.mark.parametrize("optim", [{}, {"clip_grad_norm": 0.05, "ema": True, "ema_decay": 0.9},
                                   {"name": "adamw", "lr": 0.01, "schedule": "cosine", "warmup_epochs": 0.5}],
                         ids=["sgd-momentum", "clip-ema", "adamw-cosine-warmup"])
def test_accumulating_k_batches_is_one_step_on_a_k_times_larger_batch(tmp_path, optim):
    """Tiny (a linear layer, no BatchNorm): 5 batches of 3 with train.accumulate 2 train as 3 batches
    of 6, 6 and 3 do; the epoch's last group is the one batch left, and steps too."""
    micro = Batches(n=5, batch=3)
    cfg = toy_config(optim=optim, train={"epochs": 2, "accumulate": 2})
    acc = make_trainer(tmp_path / "acc", cfg=cfg, batches=micro)
    big = make_trainer(tmp_path / "big", cfg=toy_config(optim=optim, train={"epochs": 2}), batches=merged(micro, 2))
    steps = []
    acc.optimizer.register_step_post_hook(lambda *a: steps.append(1))
    assert acc.steps_per_epoch == big.steps_per_epoch == 3  # ceil(5 / 2)
    acc.fit()
    big.fit()
    assert len(steps) == 6 and acc.scheduler.last_epoch == big.scheduler.last_epoch == 6  # 10 batches / 2, rounded up
    for k, v in big.model.state_dict().items():
        torch.testing.assert_close(acc.model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    if acc.ema is not None:
        assert acc.ema.updates == big.ema.updates == 6
        for k, v in big.ema.state_dict().items():
            torch.testing.assert_close(acc.ema.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    for a, b in zip(acc.records, big.records):  # the logged loss is the group's: the large batch's
        assert a["lr"] == pytest.approx(b["lr"]) and a["train_images"] == b["train_images"] == 15
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert load_checkpoint(tmp_path / "acc" / "last.pt")["steps_per_epoch"] == 3


def test_accumulation_counts_optimizer_steps_for_the_guard_and_the_log_points(tmp_path):
    """log_every 2 with 5 batches in groups of 2: log points after optimizer steps 2 and 3 (the
    epoch's end), not after batches 2, 4 and 5; the guard is fed once per optimizer step."""
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"accumulate": 2, "log_every": 2}),
                           batches=Batches(n=5))
    guard_steps, log_points = [], []
    real_step, real_log = trainer.guard.step, trainer.guard.log_point
    trainer.guard.step = lambda epoch, step, *a, **kw: guard_steps.append(step) or real_step(epoch, step, *a, **kw)
    trainer.guard.log_point = lambda *a, **kw: log_points.append(len(guard_steps)) or real_log(*a, **kw)
    trainer.train_one_epoch(0)
    assert guard_steps == [0, 1, 2] and log_points == [2, 3]


def test_a_nan_in_an_accumulated_batch_stops_the_run_naming_its_optimizer_step(tmp_path):
    batches = Batches(n=4)
    batches[2] = (batches[2][0] * float("nan"), batches[2][1])  # batch 3: optimizer step 2
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"accumulate": 2}), batches=batches)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step 2 \(global step 2\)"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists()


def test_a_resume_with_another_accumulate_moves_the_schedule_to_the_optimizer_step_reached(tmp_path):
    cfg = {"schedule": "cosine"}
    make_trainer(tmp_path, cfg=toy_config(optim=cfg, train={"epochs": 1})).fit()  # 4 batches: 4 steps
    lines = []
    again = make_trainer(tmp_path, cfg=toy_config(optim=cfg, train={"epochs": 2, "accumulate": 2}),
                         console=lines.append)
    again.resume(tmp_path / "last.pt")
    assert again.steps_per_epoch == 2 and again.scheduler.last_epoch == 2  # epoch 1 done: 2 steps of 2 batches
    assert f"{tmp_path / 'last.pt'}: 4 optimizer steps per epoch with 1 process(es) and train.accumulate 1, now 2 " \
           "with 1 and 2: the schedule continues at step 2 of 4" in lines
    again.fit()
    assert again.scheduler.last_epoch == 4


@pytest.mark.parametrize("train, match", [({"accumulate": 0}, r"^train.accumulate=0: batches per optimizer step"),
                                          ({"patience": 0}, r"^train.patience=0: epochs without improvement"),
                                          ({"patience": -2}, r"^train.patience=-2: epochs without improvement")])
def test_a_trainer_built_in_python_refuses_what_the_config_refuses(tmp_path, train, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, cfg=toy_config(train=train))


# ----------------------------------------------------------------------------- train.patience

def test_patience_ends_the_run_keeping_best_pt_and_saying_why(tmp_path):
    """Best at epoch 2; epochs 3 and 4 do not beat it: patience 2 ends the run after epoch 4, with
    last.pt of epoch 4, best.pt of epoch 2, the final pictures (one more evaluation) and the line."""
    evaluate = metric_sequence(0.3, 0.5, 0.5, 0.4, 0.9)
    lines = []
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 10, "patience": 2, "save_every": 3}),
                           evaluate=evaluate, console=lines.append)
    record = trainer.fit()
    assert [r["epoch"] for r in trainer.records] == _epochs(tmp_path) == [1, 2, 3, 4]
    assert evaluate.calls == [False, False, False, False, True]  # epoch 4 once more, as the run's last
    assert record["epoch"] == 4 and record["stopped_early"] == 4 and record["best_acc"] == 0.5
    assert record["val_acc"] == 0.4
    stop = "early stop at epoch 4: val_acc has not improved on 0.5 (epoch 2) for 2 epochs (train.patience=2)"
    assert lines[-2].startswith("epoch 4/10  ") and lines[-1] == stop
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert (last["epoch"], last["stopped_early"], last["best_epoch"], last["best"]) == (4, 4, 2, 0.5)
    assert (best["epoch"], best["stopped_early"], best["metrics"]["val_acc"]) == (2, None, 0.5)
    assert trainer.saved_epoch == 4  # save_every 3: the stopping epoch saves as a last one does


def test_patience_counts_epochs_and_checks_at_evaluations(tmp_path):
    """eval_every 2, patience 3: evaluations at epochs 2, 4, 6; the best is epoch 2's; at epoch 4
    it is 2 epochs old (on), at epoch 6 4 epochs (stop)."""
    evaluate = metric_sequence(0.5, 0.4, 0.4, 0.9)
    lines = []
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 10, "eval_every": 2, "patience": 3}),
                           evaluate=evaluate, console=lines.append)
    record = trainer.fit()
    assert record["stopped_early"] == 6 and evaluate.calls == [False, False, False, True]
    assert lines[-1] == "early stop at epoch 6: val_acc has not improved on 0.5 (epoch 2) for 4 epochs " \
                        "(train.patience=3)"


def test_patience_reached_at_the_last_epoch_is_a_normal_end(tmp_path):
    evaluate = metric_sequence(0.5, 0.4)
    trainer = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 2, "patience": 1}), evaluate=evaluate)
    record = trainer.fit()
    assert "stopped_early" not in record and evaluate.calls == [False, True]
    assert load_checkpoint(tmp_path / "last.pt")["stopped_early"] is None


@pytest.mark.parametrize("patience", [2, 1, 5, None])
def test_resuming_an_early_stopped_run(tmp_path, patience):
    """The patience that stopped it (or a smaller one): nothing to train, the report as for a
    finished run. A larger one, or none: it trains on, counting from the best epoch (2)."""
    cfg = toy_config(train={"epochs": 10, "patience": 2})
    make_trainer(tmp_path, cfg=cfg, evaluate=metric_sequence(0.3, 0.5, 0.5, 0.4)).fit()  # stops after epoch 4
    evaluate, lines, batches = metric_sequence(0.45), [], Batches()
    again = make_trainer(tmp_path, cfg=toy_config(train={"epochs": 10, "patience": patience}), batches=batches,
                         evaluate=evaluate, console=lines.append)
    again.resume(tmp_path / "last.pt")
    record = again.fit()
    if patience in (1, 2):
        assert batches.epochs == [] and evaluate.calls == [True]
        assert record == {"epoch": 4, "val_acc": 0.45, "best_acc": 0.5, "stopped_early": 4}
        assert lines[-1] == (f"the run stopped early after epoch 4 (val_acc 0.5 at epoch 2, 2 epochs before; "
                             f"train.patience={patience}): nothing to train; a larger train.patience, or null, "
                             "trains on")
        return
    now = "off" if patience is None else str(patience)
    assert f"the run stopped early after epoch 4; train.patience is {now} now: training on (2 epochs since the " \
           f"best, epoch 2)" in lines
    if patience == 5:  # 0.45 never beats 0.5: stops 5 epochs after epoch 2
        assert batches.epochs == [4, 5, 6] and record["stopped_early"] == 7
    else:
        assert batches.epochs == list(range(4, 10)) and "stopped_early" not in record
    assert _epochs(tmp_path) == list(range(1, record["epoch"] + 1))

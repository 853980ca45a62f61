"""The training guard (tasks/engine/guard.py): each condition stops a run with one line, a
non-zero exit, and leaves no checkpoint holding a non-finite tensor; normal runs pass. (Through
the commands: tests/e2e/test_guard_runs.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks import classify
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.config import ConfigError, config_from_dict, load_config
from tasks.engine.guard import FROZEN_MIN_STEPS, ZERO_MIN_STEPS, NonFiniteLossError, TrainingGuardError, first_nonfinite
from tasks.engine.loop import Trainer
from tests.fakes import checkpoints_finite


class Toy(nn.Module):
    """conv + BatchNorm + linear; training returns two named loss terms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y=None):
        logits = self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))
        if self.training:
            return {"cls": F.cross_entropy(logits, y), "aux": logits.pow(2).mean() * 1e-3}
        return logits


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _cfg(**sections):
    data = {"optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant", "warmup_epochs": 0},
            "train": {"epochs": 3, "amp": False, "channels_last": False, "log_every": 4}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(classify.ClassifyConfig, data)


def _trainer(tmp_path, cfg=None, model=None, batches=None, metric=0.5):
    torch.manual_seed(0)
    metrics = metric if callable(metric) else (lambda m, final: {"acc": metric})
    return Trainer("classify", cfg or _cfg(), model or Toy(), batches or _batches(FROZEN_MIN_STEPS),
                   evaluate=metrics, main_metric="acc", output=tmp_path, device=torch.device("cpu"), quiet=True)


def test_normal_run_passes_and_saves(tmp_path):
    record = _trainer(tmp_path).fit()
    assert record["epoch"] == 3 and (tmp_path / "last.pt").exists()
    checkpoints_finite(tmp_path)


def test_diverging_loss_stops(tmp_path):
    class Diverging(Toy):
        calls = 0

        def forward(self, x, y=None):
            out = super().forward(x, y)
            if self.training:
                Diverging.calls += 1
                if Diverging.calls > FROZEN_MIN_STEPS + 4:  # epoch 2, from its 5th step: 1000x the loss
                    out["cls"] = out["cls"] * 1000
            return out

    trainer = _trainer(tmp_path, model=Diverging())
    with pytest.raises(TrainingGuardError, match=r"diverged: mean .* over steps 5-8 of epoch 2.*optim.lr \(now 0.05\)"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # epoch 2 was not saved
    checkpoints_finite(tmp_path)


def test_frozen_loss_term_stops(tmp_path):
    class Frozen(Toy):
        def forward(self, x, y=None):
            out = super().forward(x, y)
            if self.training:  # a term that receives no gradient and never moves (the dead-ReLU GIoU of 1.0)
                out["aux"] = out["aux"].detach() * 0 + 1.0
            return out

    with pytest.raises(TrainingGuardError, match=r"loss term 'aux' stayed at 1 .* all 8 steps of epoch 1"):
        _trainer(tmp_path, model=Frozen()).fit()
    assert not (tmp_path / "last.pt").exists()


def test_frozen_check_pools_short_epochs_and_skips_a_zero_lr(tmp_path):
    class Frozen(Toy):
        def forward(self, x, y=None):
            out = super().forward(x, y)
            if self.training:
                out["aux"] = out["aux"].detach() * 0 + 2.0
            return out

    # 3 steps per epoch: the window pools epochs 1-3 (9 steps >= 8) and fires at the end of epoch 3
    with pytest.raises(TrainingGuardError, match=r"'aux' stayed at 2 .* 9 steps of epoch 1 step 1 to the end "
                                                 r"of epoch 3"):
        _trainer(tmp_path / "a", model=Frozen(), batches=_batches(3)).fit()
    # lr 0 throughout (e.g. --set optim.lr=0 to check a pipeline): nothing can move, nothing fires
    _trainer(tmp_path / "b", cfg=_cfg(optim={"lr": 0.0}), model=Frozen()).fit()
    # and the guard can be turned off
    _trainer(tmp_path / "c", cfg=_cfg(train={"guard": False}), model=Frozen()).fit()


def test_nonfinite_batchnorm_statistics_stop_before_saving(tmp_path):
    model = Toy()
    batches = _batches(FROZEN_MIN_STEPS)

    class Poisoning(list):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if self.epoch == 1 and i == 5:  # the loss stays finite: training uses batch statistics
                    model.bn.running_var[0] = float("inf")
                yield batch

    with pytest.raises(NonFiniteLossError, match=r"model.bn.running_var holds NaN or inf values after epoch 2"):
        _trainer(tmp_path, model=model, batches=Poisoning(batches)).fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    checkpoints_finite(tmp_path)


def test_nonfinite_gradient_is_named(tmp_path):
    model = Toy()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    model.fc.weight.register_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at epoch 1, step 3"):
        _trainer(tmp_path, model=model).fit()
    assert not (tmp_path / "last.pt").exists()


def test_zero_metric_after_warmup_stops(tmp_path):
    epoch_steps = ZERO_MIN_STEPS // 2  # the first eval ZERO_MIN_STEPS past the warm-up ends epoch 3
    cfg = _cfg(optim={"warmup_epochs": 1.0}, train={"epochs": 5, "log_every": 25})
    # epochs 1 (the warm-up) and 2 are too early to judge; epochs 3 and 4 at 0 stop the run at epoch 4
    with pytest.raises(TrainingGuardError, match=r"validation acc is 0 after epochs 3, 4 \(past the warm-up\)"):
        _trainer(tmp_path, cfg=cfg, metric=0.0, batches=_batches(epoch_steps)).fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    # one zero between non-zero evaluations is not a collapse
    values = iter([0.0, 0.0, 0.0, 0.2, 0.0])
    _trainer(tmp_path / "b", cfg=cfg, metric=lambda m, final: {"acc": next(values)}, batches=_batches(epoch_steps)).fit()
    # nor is a short smoke run at 0
    _trainer(tmp_path / "c", cfg=_cfg(train={"epochs": 4}), metric=0.0).fit()


@pytest.mark.parametrize("item", ["optim.momentum=.nan", "optim.lr=inf", "optim.weight_decay=-.inf",
                                  "optim.clip_grad_norm=.nan"])
def test_nonfinite_config_values_are_refused(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*finite number"):
        load_config(classify.ClassifyConfig, None, [item])


def test_first_nonfinite_names_the_tensor():
    state = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan])}, "steps": torch.tensor(3)}
    assert first_nonfinite(state) == "model.b"
    assert first_nonfinite({"model": {"a": torch.ones(2)}, "optimizer": {0: {"exp_avg": torch.zeros(2)}}}) is None

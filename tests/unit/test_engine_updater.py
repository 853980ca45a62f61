"""The updater (tasks/engine/updater.py): clipping to the norm, one schedule step per optimizer
step, the EMA, the gradient norm for the guard, and its checkpoint state."""
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from tasks.engine.ema import ModelEMA
from tasks.engine.updater import OptimizerStateError, Updater, grad_norm, seek_schedule
from tests.engine_fakes import Batches, Tiny


def _backward(model, scale=1.0):
    x, y = Batches(1)[0]
    model.zero_grad()
    (sum(model(x, y).values()) * scale).backward()


def _updater(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # lr 1, no momentum: the step is minus the gradient
    sched = LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return Updater(model, opt, sched, **kw)


def test_clips_to_the_norm_and_returns_the_norm_before_clipping():
    model = Tiny()
    up = _updater(model, clip=0.01)
    _backward(model, scale=100.0)
    before = [p.detach().clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    norm, lr = up.step()
    assert isinstance(norm, torch.Tensor) and norm.ndim == 0  # on the device: read by the guard at log points
    torch.testing.assert_close(norm, expected)
    assert expected > 0.01 and lr == 1.0
    moved = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in zip(model.parameters(), before)]))
    torch.testing.assert_close(moved, torch.tensor(0.01), rtol=1e-4, atol=0)  # the update was the clipped gradient


def test_steps_the_schedule_once_per_step_and_reports_the_lr_it_used():
    model = Tiny()
    up = _updater(model)
    lrs = []
    for _ in range(4):
        _backward(model)
        lrs.append(up.step()[1])
    assert up.scheduler.last_epoch == 4
    assert lrs == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4])  # the lr of each step, before the schedule moved on
    assert up.optimizer.param_groups[0]["lr"] == pytest.approx(1 / 5)


def test_gradient_norm_only_when_clipping_or_asked_for():
    model = Tiny()
    _backward(model)
    assert _updater(model).step()[0] is None
    _backward(model)
    expected = grad_norm(list(model.parameters()))
    norm, _ = _updater(model, want_grad_norm=True).step()
    torch.testing.assert_close(norm, expected)
    model.zero_grad(set_to_none=True)
    assert grad_norm(list(model.parameters())) is None


def test_updates_the_ema_after_every_step():
    model = Tiny()
    ema = ModelEMA(model, decay=0.5)
    start = ema.module.fc.weight.detach().clone()
    up = _updater(model, ema=ema)
    for _ in range(3):
        _backward(model)
        up.step()
    assert ema.updates == 3
    assert not torch.equal(ema.module.fc.weight, start)
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)  # an average, not a copy


def test_state_round_trip_and_a_schedule_that_does_not_fit():
    model = Tiny()
    up = _updater(model, ema=ModelEMA(model, decay=0.5))
    for _ in range(3):
        _backward(model)
        up.step()
    state = up.state_dict()
    assert set(state) == {"ema", "ema_steps", "optimizer", "scheduler", "grad_scaler"}
    assert state["ema_steps"] == 3 and state["grad_scaler"] is None

    fresh = _updater(Tiny(), ema=ModelEMA(Tiny(), decay=0.5))
    fresh.load_state_dict(state)
    assert fresh.scheduler.last_epoch == 3 and fresh.ema.updates == 3
    kept = _updater(Tiny(), ema=ModelEMA(Tiny(), decay=0.5))
    kept.load_state_dict(state, schedule=False)  # another run length: the schedule is rebuilt instead
    assert kept.scheduler.last_epoch == 0
    kept.rebuild_schedule(LambdaLR(kept.optimizer, lambda step: 1.0 / (1 + step)), 3)
    assert kept.scheduler.last_epoch == 3 and kept.optimizer.param_groups[0]["lr"] == pytest.approx(1 / 4)

    other = torch.nn.Linear(4, 2)
    mismatch = Updater(other, torch.optim.SGD([{"params": [other.weight]}, {"params": [other.bias]}], lr=1.0),
                       LambdaLR(torch.optim.SGD(other.parameters(), lr=1.0), lambda s: 1.0))
    with pytest.raises(OptimizerStateError):
        mismatch.load_state_dict(state)


def test_seek_schedule_lands_where_stepping_would():
    model = Tiny()
    stepped = _updater(model)
    for _ in range(5):
        stepped.optimizer.step()  # no gradients: nothing moves
        stepped.scheduler.step()
    sought = _updater(Tiny())
    seek_schedule(sought.scheduler, 5)
    assert sought.scheduler.last_epoch == stepped.scheduler.last_epoch == 5
    assert sought.optimizer.param_groups[0]["lr"] == pytest.approx(stepped.optimizer.param_groups[0]["lr"])

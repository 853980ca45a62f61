"""Optimizer helpers: zero momentum buffers for SGD under loss scaling; seeking a schedule on resume."""
import pytest
import torch

from tasks.engine.config import OptimConfig, config_from_dict
from tasks.engine.loop import seek_schedule
from tasks.engine.optim import build_optimizer, build_scheduler, zero_momentum_buffers


def _params():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    return [conv.weight, conv.bias]


@pytest.mark.parametrize("fused", [False, True])
def test_zero_momentum_buffers_give_the_same_steps_and_keep_the_layout(fused):
    a, b = _params(), [p.detach().clone().requires_grad_(True) for p in _params()]
    opt_a = torch.optim.SGD(a, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
    zero_momentum_buffers(opt_b)
    buf = opt_b.state[b[0]]["momentum_buffer"]
    assert torch.count_nonzero(buf) == 0 and buf.stride() == b[0].stride()  # channels_last kept
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=g).to(memory_format=torch.preserve_format)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pb, pa, rtol=0, atol=0)


def test_zero_momentum_buffers_keep_existing_state_and_refuse_dampening():
    p = _params()
    opt = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    p[0].grad, p[1].grad = torch.ones_like(p[0]), torch.ones_like(p[1])
    opt.step()
    before = opt.state[p[0]]["momentum_buffer"].clone()
    zero_momentum_buffers(opt)  # a resumed optimizer: its buffers stay
    torch.testing.assert_close(opt.state[p[0]]["momentum_buffer"], before)
    zero_momentum_buffers(torch.optim.SGD(_params(), lr=0.1))  # no momentum: nothing to do
    zero_momentum_buffers(torch.optim.AdamW(_params(), lr=0.1))  # not SGD: untouched
    with pytest.raises(ValueError, match="dampening"):
        zero_momentum_buffers(torch.optim.SGD(_params(), lr=0.1, momentum=0.9, dampening=0.1))


def test_grad_scaler_only_for_float16_on_cuda():
    from tasks.engine.optim import build_grad_scaler

    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    assert build_grad_scaler(opt, torch.float16, torch.device("cpu")) is None  # no autocast on the CPU
    assert build_grad_scaler(opt, torch.bfloat16, torch.device("cuda")) is None  # bf16's range needs no scaling
    assert not opt.state  # nothing built: the buffers stay PyTorch's own


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_seek_schedule_equals_stepping(schedule):
    """Resuming with another world size rebuilds the schedule and moves it to the step."""
    cfg = config_from_dict(OptimConfig, {"schedule": schedule, "warmup_epochs": 1.0})

    def build():
        opt = build_optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))
        return opt, build_scheduler(opt, cfg, epochs=4, steps_per_epoch=5)
    opt, sched = build()
    for _ in range(13):
        opt.step()
        sched.step()
    opt2, sched2 = build()
    seek_schedule(sched2, 13)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    for g, g2 in zip(opt.param_groups, opt2.param_groups):
        assert g2["lr"] == pytest.approx(g["lr"]) and g2["momentum"] == pytest.approx(g["momentum"])
    opt.step(), sched.step()
    opt2.step(), sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_norm_weights_and_biases_decay_only_when_asked():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    for norm_decay in (0.0, 2.0):
        cfg = config_from_dict(OptimConfig, {"name": "adamw", "weight_decay": 0.5, "norm_weight_decay": norm_decay})
        groups = build_optimizer(model, cfg, torch.device("cpu")).param_groups
        decays = {p.ndim: g["weight_decay"] for g in groups for p in g["params"]}
        assert decays == {4: 0.5, 1: norm_decay}

"""The training step objects (tasks/engine/step.py): what each mode computes, the factory's
choice of mode, the graphed step's capture bookkeeping and gradient all-reduce (with a fake graph)."""
import pytest
import torch
from torch import nn

from tasks.engine.step import (CompiledStep, EagerStep, GraphedStep, TrainStep, autocast, build_step, one_image_batches,
                               unwrap)
from tests.engine_fakes import Batches, Tiny, toy_config

CPU = torch.device("cpu")


def _build(cfg, model=None, world=1):
    model = model or Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return build_step(model, opt, cfg.train, CPU, amp=False, world=world, console=lambda msg: None), model, opt


def test_factory_picks_eager_on_the_cpu_even_with_cuda_graph_on():
    step, model, _ = _build(toy_config(train={"cuda_graph": True}))
    assert type(step) is EagerStep and step.graphed is None and step.module is model


def test_factory_picks_the_compiled_step_and_passes_kernel_tuning(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(kw) or module)
    step, _, _ = _build(toy_config(train={"compile": True, "compile_tune": True}))
    assert type(step) is CompiledStep and isinstance(step, EagerStep)
    assert compiled == [{"options": {"coordinate_descent_tuning": True}}]
    with pytest.raises(ValueError, match="compile_tune.*needs train.compile=true"):
        _build(toy_config(train={"compile_tune": True}))


def test_eager_step_backpropagates_the_sum_of_the_loss_terms():
    x, y = Batches(1)[0]
    step, model, _ = _build(toy_config())
    loss, terms = step(x, y)
    assert set(terms) == {"mse", "l2"} and torch.equal(loss, terms["mse"] + terms["l2"])
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model(x, y).values()).backward()
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad)
    step(x, y)  # a second step does not accumulate onto the first one's gradients
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_eager_step_zeroes_gradients_in_place_under_ddp():
    """One process: gradients set to None between steps; several (DDP's bucket views): zeroed in place."""
    x, y = Batches(1)[0]
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    one = EagerStep(model, opt, device=CPU, amp=False, world=1)
    one(x, y)
    grad = model.fc.weight.grad
    one(x, y)
    assert model.fc.weight.grad is not grad
    ddp = EagerStep(model, opt, device=CPU, amp=False, world=2)
    ddp(x, y)
    grad = model.fc.weight.grad
    ddp(x, y)
    assert model.fc.weight.grad is grad


class FakeGraph:
    """Stands in for GraphedForwardBackward: eager forward + backward, 'captured' after ``warmup`` calls."""

    def __init__(self, model, warmup=2):
        self.forward, self.warmup, self.seen, self.graph = model, warmup, 0, None

    def __call__(self, images, targets):
        self.seen += 1
        if self.seen > self.warmup:
            self.graph = object()
        terms = self.forward(images, targets)
        loss = sum(terms.values())
        self.forward.zero_grad()
        loss.backward()
        return loss.detach(), terms


def test_graphed_step_records_its_capture_once_and_reduces_gradients_after_each_replay():
    model = Tiny()
    calls = []
    step = GraphedStep(FakeGraph(model), device=CPU, grad_sync=lambda: calls.append(model.fc.weight.grad is not None))
    assert isinstance(step, TrainStep) and step.module is model and step.graphed.graph is None
    x, y = Batches(1)[0]
    step.begin_epoch(0.0)
    for _ in range(5):
        step(x, y)
    assert calls == [True] * 5  # after backward, every step
    assert step.extra["capture_steps"] == 3 and step.extra["capture_s"] > 0
    step.begin_epoch(0.0)  # the next epoch: nothing captured in it
    step(x, y)
    assert step.extra == {}


def test_a_batch_of_one_image_through_batch_norm_is_one_line():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"^training batch 3 of epoch 2 holds 1 image: BatchNorm cannot train on a "
                                         r"batch of one image.*--batch-size\) >= 2.*the 1's BatchNorm layers"):
        with one_image_batches(model, 1, epoch=1, step=2, images=torch.zeros(1, 4)):
            model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="something else"):  # other errors pass through
        with one_image_batches(model, 1, 0, 0, torch.zeros(1, 4)):
            raise ValueError("something else")


def test_unwrap_and_autocast():
    model = Tiny()
    wrapped = nn.Module()
    wrapped.module = model  # as DDP / EMA hold it
    outer = nn.Module()
    outer._orig_mod = wrapped  # as torch.compile holds it
    assert unwrap(outer) is model and unwrap(model) is model
    model.eval()
    with autocast(CPU, enabled=True):  # no autocast on the CPU: fp32
        assert model(torch.zeros(1, 4)).dtype == torch.float32


# ----------------------------------------------------------------------------- train.accumulate

def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_eager_step_adds_scaled_gradients_after_the_first_of_a_group():
    (x1, y1), (x2, y2) = Batches(2)
    step, model, _ = _build(toy_config())
    step(x2, y2)  # gradients of an earlier step: the group's first batch starts from zero
    loss, _ = step(x1, y1, first=True, last=False, scale=0.5)
    step(x2, y2, first=False, last=True, scale=0.5)
    got = _grads(model)
    model.zero_grad()
    (sum(model(x1, y1).values()) * 0.5 + sum(model(x2, y2).values()) * 0.5).backward()
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad)
    assert torch.equal(loss, sum(model(x1, y1).values()).detach())  # the returned loss is not scaled


def test_under_ddp_the_batches_before_a_groups_last_keep_their_gradients_local(tmp_path, monkeypatch):
    """A real DDP module (a one-process gloo group): DDP's forward runs under no_sync for every
    batch of a group but its last (where the backward all-reduces), compiled or not."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model = Tiny()
        ddp = DistributedDataParallel(model)
        syncs = []
        model.register_forward_pre_hook(lambda m, args: syncs.append(ddp.require_backward_grad_sync))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = EagerStep(ddp, opt, device=CPU, amp=False, world=2)
        (x1, y1), (x2, y2) = Batches(2)
        for first, last, (x, y) in [(True, False, (x1, y1)), (False, False, (x2, y2)), (False, True, (x1, y1))]:
            step(x, y, first=first, last=last, scale=1 / 3)
        assert syncs == [False, False, True] and ddp.require_backward_grad_sync
        got = _grads(model)
        model.zero_grad()
        (sum(sum(model(x, y).values()) for x, y in [(x1, y1), (x2, y2), (x1, y1)]) / 3).backward()
        for a, b in zip(got, model.parameters()):
            torch.testing.assert_close(a, b.grad)

        class Compiled(nn.Module):  # what torch.compile returns: the DDP module as _orig_mod
            def __init__(self, inner):
                super().__init__()
                self._orig_mod = inner

            def forward(self, *args):
                return self._orig_mod(*args)
        monkeypatch.setattr(torch, "compile", lambda module, **kw: Compiled(module))
        compiled = CompiledStep(ddp, opt, device=CPU, amp=False, world=2)
        assert compiled.ddp is ddp and step.ddp is ddp and EagerStep(model, opt, device=CPU, amp=False).ddp is None
        syncs.clear()
        compiled(x1, y1, first=True, last=False, scale=0.5)
        assert syncs == [False]
    finally:
        dist.destroy_process_group()


def test_a_graphed_step_does_not_accumulate():
    """Each replay writes the gradients afresh: the runner resolves train.cuda_graph off (one
    line, config.yaml records it), build_step refuses the pair, the step refuses a group."""
    from tasks.classify import ClassifyConfig
    from tasks.engine.config import config_from_dict
    from tasks.engine.runner import resolve_switches

    cuda = torch.device("cuda")  # resolve_switches reads the type; build_step refuses before touching it
    cfg = config_from_dict(ClassifyConfig, {"train": {"cuda_graph": True, "graph_eval": True, "accumulate": 4}})
    assert resolve_switches(cfg, cuda) == ["train.cuda_graph: false (train.accumulate=4: a replayed graph writes the "
                                           "gradients afresh, it cannot add micro-batches up)"]
    assert not cfg.train.cuda_graph and cfg.train.graph_eval  # evaluation graphs are not concerned
    varying = config_from_dict(ClassifyConfig, {"train": {"cuda_graph": True, "accumulate": 4}})
    assert resolve_switches(varying, cuda, fixed_shapes=False) == [  # one reason per switch
        "train.cuda_graph, train.cudnn_benchmark: false (the batches of data.resize=aspect vary in shape: eager "
        "steps, no autotuning)"]
    one = config_from_dict(ClassifyConfig, {"train": {"cuda_graph": True}})
    assert resolve_switches(one, cuda) == [] and one.train.cuda_graph

    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^train.accumulate=2 needs train.cuda_graph=false"):
        build_step(model, opt, toy_config(train={"cuda_graph": True, "accumulate": 2}).train, cuda, amp=False)
    step = GraphedStep(FakeGraph(model), device=CPU)
    x, y = Batches(1)[0]
    step(x, y)
    with pytest.raises(ValueError, match="cannot accumulate gradients"):
        step(x, y, first=True, last=False, scale=0.5)

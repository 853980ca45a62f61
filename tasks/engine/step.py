"""The training step: forward, the loss terms summed, backward; one object per mode.

``step(images, targets) -> (loss, loss_dict)`` leaves the gradients in ``.grad``; the updater
(``updater.py``) then clips them and steps the optimizer. With ``train.accumulate`` K the loop
calls the step on K micro-batches per optimizer step (``first``: the gradients start from zero;
``scale``: the loss is backpropagated times 1 / the group's size, so the gradient is the mean over
the group, as one batch of all its images would give; ``last``: under DDP, the one that
all-reduces). The modes:

* ``EagerStep``: the module under autocast, backward on the (float16: scaled) loss.
* ``CompiledStep``: the same over ``torch.compile(module)`` (``train.compile``).
* ``GraphedStep``: forward + backward captured once and replayed as a CUDA graph
  (``train.cuda_graph``, ``graphs.GraphedForwardBackward``; compiled first with ``train.compile``).
  Each replay writes the gradients afresh (they are outputs of the captured backward), so it
  cannot accumulate: ``train.accumulate`` > 1 and ``train.cuda_graph`` are not combined (the
  runner resolves the graph off; ``build_step`` refuses the pair).

Under ``torchrun`` the eager and compiled steps run the ``DistributedDataParallel`` module
(``wrap_ddp``: its all-reduce overlaps backward; the micro-batches before an accumulation
group's last run under its ``no_sync``: one all-reduce per optimizer step); the graphed step
cannot (DDP's hooks are not capturable), so every rank starts from rank 0's weights and the
gradients are averaged in one flat all-reduce after each replay. ``build_step`` picks the mode
from the config, the device and the world size.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .graphs import GraphedForwardBackward

__all__ = ["TrainStep", "EagerStep", "CompiledStep", "GraphedStep", "build_step", "wrap_ddp", "compile_module",
           "check_sync_bn", "one_image_batches", "one_image_batch_error", "autocast", "unwrap"]

_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"
Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """Autocast on CUDA (bf16 by default: no loss scaling needed); plain fp32 elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` / DDP / EMA wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


# ----------------------------------------------------------------------------- the steps

class TrainStep:
    """``step(images, targets, *, first=True, last=True, scale=1.0) -> (loss, loss_dict)``,
    gradients left in ``.grad`` (added to those there unless ``first``; ``scale`` multiplies the
    backpropagated loss, not the returned one; ``last`` False: DDP keeps the gradients local).

    ``module``: what the step calls (the DDP / compiled wrapper, or the model); ``graphed``: the
    ``GraphedForwardBackward`` of a graphed step, else None; ``extra``: what the epoch since
    ``begin_epoch(start)`` records about the step (``train_<key>`` in ``metrics.jsonl``)."""

    module: nn.Module
    graphed: GraphedForwardBackward | None = None
    extra: dict[str, float]

    def begin_epoch(self, start: float) -> None:
        """The epoch's clock started at ``start`` (``time.perf_counter()``)."""

    def __call__(self, images: torch.Tensor, targets: Any, *, first: bool = True, last: bool = True,
                 scale: float = 1.0) -> Losses:
        raise NotImplementedError


class EagerStep(TrainStep):
    """Forward under autocast, the loss dict summed, backward (on the scaled loss under float16).
    ``world``: the number of processes (``module`` is the DDP module when it is more than one,
    or ``torch.compile`` of it)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device, amp: bool,
                 dtype: torch.dtype = torch.bfloat16, scaler: torch.amp.GradScaler | None = None,
                 world: int = 1) -> None:
        self.module, self.optimizer = module, optimizer
        self.device, self.amp, self.dtype, self.scaler = device, amp, dtype, scaler
        self.world = world
        self.extra = {}
        # DDP's no_sync for the micro-batches before a group's last. Under torch.compile too:
        # dynamo compiles the module DDP wraps, while DDP's forward (which reads the flag no_sync
        # sets, and arms the reducer) runs eagerly around it.
        ddp = getattr(module, "_orig_mod", module)
        self.ddp = ddp if isinstance(ddp, DistributedDataParallel) else None

    def __call__(self, images: torch.Tensor, targets: Any, *, first: bool = True, last: bool = True,
                 scale: float = 1.0) -> Losses:
        # forward and backward both inside no_sync: DDP decides in its forward whether the
        # backward all-reduces
        with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
            with autocast(self.device, self.amp, self.dtype):
                loss_dict = self.module(images, targets)
            loss = sum(loss_dict.values())
            if first:
                # DDP: the gradients are views into its all-reduce buckets; zeroing them in place
                # keeps them so (set to None, each step would allocate and copy them again)
                self.optimizer.zero_grad(set_to_none=self.world == 1)
            scaled = loss * scale if scale != 1.0 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss, loss_dict


def compile_module(module: nn.Module, tune: bool = False) -> nn.Module:
    """``torch.compile(module)``; ``tune`` (``train.compile_tune``): coordinate-descent tuning
    searches block sizes of inductor's Triton kernels (the BatchNorm / ReLU / residual work):
    ResNet-50 bs 256 kernel time -8% on an H200."""
    return torch.compile(module, options={"coordinate_descent_tuning": True} if tune else None)


class CompiledStep(EagerStep):
    """The eager step over ``torch.compile(module)``. Under torchrun ``module`` is the DDP
    module: torch.compile wraps DDP (PyTorch's recipe: DDP's optimizer splits the graph at
    gradient-bucket boundaries so the all-reduce still overlaps backward)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, tune: bool = False, **kw: Any) -> None:
        super().__init__(compile_module(module, tune), optimizer, **kw)


class GraphedStep(TrainStep):
    """A replayed CUDA graph of forward + backward (``GraphedForwardBackward``), then, under
    torchrun, ``grad_sync`` (the flat gradient all-reduce). The epoch that captures the graph
    records ``extra = {"capture_s", "capture_steps"}``: seconds from the epoch's start until the
    captured step had run, and how many steps that took (warm-up, compile, capture included)."""

    def __init__(self, graphed: GraphedForwardBackward, *, device: torch.device,
                 grad_sync: Callable[[], None] | None = None) -> None:
        self.graphed, self.device, self.grad_sync = graphed, device, grad_sync
        self.module = graphed.forward
        self.extra = {}
        self._start, self._steps, self._capturing = 0.0, 0, False

    def begin_epoch(self, start: float) -> None:
        self._start, self._steps, self.extra = start, 0, {}
        self._capturing = self.graphed.graph is None

    def __call__(self, images: torch.Tensor, targets: Any, *, first: bool = True, last: bool = True,
                 scale: float = 1.0) -> Losses:
        if not (first and last and scale == 1.0):  # build_step refuses the pair; a direct caller is told
            raise ValueError("the CUDA-graphed step cannot accumulate gradients (each replay writes them afresh): "
                             "train.accumulate > 1 needs train.cuda_graph=false")
        self._steps += 1
        loss, loss_dict = self.graphed(images, targets)
        if self.grad_sync is not None:
            self.grad_sync()
        if self._capturing and self.graphed.graph is not None:  # once per run: one sync
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.extra = {"capture_s": time.perf_counter() - self._start, "capture_steps": self._steps}
            self._capturing = False
        return loss, loss_dict


# ----------------------------------------------------------------------------- DDP and the factory

def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` as ``DistributedDataParallel``. Every rank starts from rank 0's weights (DDP
    broadcasts them). BatchNorm running statistics are not used by the training forward: rather
    than broadcasting them before every step, evaluation copies rank 0's (``Trainer.evaluate``)."""
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    no_buffer_sync = ({"forward_sync_buffers": False}  # broadcast_buffers' newer name
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **no_buffer_sync)
    # On the first step a 1x1 conv's weight gradient may come with other strides on its
    # size-1 dims than the bucket view: the same memory layout, one copy, then aliased.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return ddp


def check_sync_bn(model: nn.Module, world: int, device: torch.device, console: Callable[[str], None]) -> bool:
    """Whether the model has SyncBatchNorm layers (an error where they cannot work)."""
    if not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return False
    if world == 1:
        console("model.norm=syncbn in one process: plain batch norm (SyncBatchNorm synchronises "
                "statistics only across the processes of torchrun)")
    elif device.type != "cuda":
        raise ValueError("model.norm=syncbn needs CUDA devices under torchrun (PyTorch's SyncBatchNorm has "
                         "no CPU / gloo implementation): use model.norm=bn or gn")
    return True


def build_step(model: nn.Module, optimizer: torch.optim.Optimizer, train_cfg: Any, device: torch.device, *,
               amp: bool, dtype: torch.dtype = torch.bfloat16, scaler: torch.amp.GradScaler | None = None,
               world: int = 1, sync_bn: bool = False, console: Callable[[str], None] = print) -> TrainStep:
    """The step ``train_cfg`` (``train.cuda_graph``, ``train.compile``, ``train.compile_tune``)
    asks for on ``device`` with ``world`` processes: CUDA graphs only on CUDA (eager elsewhere),
    and not with SyncBatchNorm under torchrun. A graphed step does not accumulate gradients:
    ``train.accumulate`` > 1 with ``train.cuda_graph`` on CUDA is refused (the runner's
    ``resolve_switches`` turns the graph off first, and says so)."""
    if train_cfg.compile_tune and not train_cfg.compile:
        raise ValueError("train.compile_tune tunes torch.compile's kernels: it needs train.compile=true")
    cuda_graph = train_cfg.cuda_graph and device.type == "cuda"
    if cuda_graph and train_cfg.accumulate > 1:
        raise ValueError(f"train.accumulate={train_cfg.accumulate} needs train.cuda_graph=false: a replayed "
                         "CUDA graph writes the gradients afresh, it cannot add micro-batches up")
    if cuda_graph and world > 1 and sync_bn:
        console("train.cuda_graph is off with model.norm=syncbn (its collectives run inside the forward)")
        cuda_graph = False
    if cuda_graph:
        grad_sync = None
        if world > 1:
            # DDP's all-reduce runs from autograd hooks on its own stream, which a CUDA graph
            # cannot capture: the graphed step replays forward + backward, then the gradients
            # are averaged in one flat all-reduce (no overlap with backward; for the small
            # models graphs are for, launch overhead is the larger cost).
            distributed.broadcast_module(model)
            grad_sync = distributed.GradientAllReduce(model.parameters())
        # the graph captures the compiled kernels when train.compile is on (the warm-up steps
        # before capture compile forward and backward); with graphs the model is never DDP
        module = compile_module(model, train_cfg.compile_tune) if train_cfg.compile else model
        graphed = GraphedForwardBackward(module, optimizer, amp=amp, dtype=dtype, scaler=scaler)
        return GraphedStep(graphed, device=device, grad_sync=grad_sync)
    module = wrap_ddp(model, device) if world > 1 else model
    kw = dict(device=device, amp=amp, dtype=dtype, scaler=scaler, world=world)
    if train_cfg.compile:
        return CompiledStep(module, optimizer, tune=train_cfg.compile_tune, **kw)
    return EagerStep(module, optimizer, **kw)


# ----------------------------------------------------------------------------- batches of one image

def _training_batch_norms(model: nn.Module, world: int) -> list[str]:
    """Names of the BatchNorm layers that normalise with batch statistics in training (not
    frozen ones, nor SyncBatchNorm across several processes, whose batch spans the ranks)."""
    model = unwrap(model)
    was = model.training
    model.train()  # frozen stages stay in eval mode (ResNet.train)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and not (isinstance(m, nn.SyncBatchNorm) and world > 1)]
    model.train(was)
    return names


def one_image_batch_error(model: nn.Module, world: int, detail: str, fix: str) -> ValueError:
    bn = _training_batch_norms(model, world)
    if bn and all(n.startswith("backbone.") for n in bn):
        fix += ", or set model.norm=gn / frozen_bn (no batch statistics)"
    elif bn:  # the segmentation head's BatchNorm, say: model.norm does not change it
        fix += f" (the {bn[0].split('.')[0]}'s BatchNorm layers need it whatever model.norm is)"
    return ValueError(f"{detail}: BatchNorm cannot train on a batch of one image (one value per channel); {fix}")


@contextlib.contextmanager
def one_image_batches(model: nn.Module, world: int, epoch: int, step: int, images: torch.Tensor):
    """PyTorch's "Expected more than 1 value per channel" as one line naming the batch size.
    Not refused up front: BatchNorm trains on one image whenever its input has more than one
    pixel per channel (dense tasks at batch 1, a one-image overfit check); it fails only
    where a feature map is 1x1 (ResNet's C5 of a 28x28 image through the ImageNet stem)."""
    try:
        yield
    except ValueError as e:
        if _ONE_VALUE_PER_CHANNEL not in str(e):
            raise
        raise one_image_batch_error(
            model, world, f"training batch {step + 1} of epoch {epoch + 1} holds {images.shape[0]} image",
            "use train.batch_size (--batch-size) >= 2 with no batch of one image") from None

"""Forward + backward of a training step, and eval-mode inference, as replayed CUDA graphs.

A small model on small images (ResNet-18 on 28x28) finishes its kernels faster than Python
can launch them: eager PyTorch then runs at the speed of the host, not of the GPU. Capturing
forward, loss and backward once and replaying the graph turns ~500 launches per step into
one. The optimizer step, LR schedule, gradient clipping and EMA stay eager (a handful of fused
launches), so schedulers that change momentum or lr as Python floats work unchanged.

Rules the capture relies on (PyTorch's "whole-network capture" recipe): a few warm-up steps
on a side stream before capture (cuDNN autotuning, lazy allocations); gradients set to None
right before capture so backward writes them into the graph's memory, and never set to None
again; autocast without its weight cache; fixed input shapes (other shapes run eagerly).
Targets may be a tensor or a dict / list of tensors (detection's padded boxes and labels);
every tensor in them is a static input of the graph.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["GraphedForwardBackward", "GraphedInference", "inference_model", "inference_models"]

LossFn = Callable[[torch.Tensor, Any], dict[str, torch.Tensor]]


def _detached(loss: torch.Tensor, loss_dict: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # Losses returned with their grad_fn keep the spent autograd graph alive, and with it the
    # parameters' AccumulateGrad nodes, bound to the stream they were made on (the side or the
    # capture stream), into the next backward on another stream: the likely source of the
    # "AccumulateGrad node's stream does not match" warning seen in graphed runs. The caller
    # only reads the values.
    return loss.detach(), {k: v.detach() for k, v in loss_dict.items()}


class GraphedForwardBackward:
    """``step(images, targets) -> (loss, loss_dict)`` with gradients left in ``.grad``.

    Args:
        forward: ``(images, targets) -> dict of losses`` (the model in training mode).
        optimizer: only used to reset gradients.
        amp: autocast inside the step, to ``dtype``.
        warmup: eager steps before capture.
        scaler: a ``torch.amp.GradScaler`` (float16): backward runs on the scaled loss (the scale
            is a device tensor, read at each replay); the returned losses are unscaled. The
            caller steps the optimizer through the scaler.
    """

    def __init__(self, forward: LossFn, optimizer: torch.optim.Optimizer, *, amp: bool, warmup: int = 3,
                 dtype: torch.dtype = torch.bfloat16, scaler: torch.amp.GradScaler | None = None) -> None:
        self.forward = forward
        self.optimizer = optimizer
        self.amp = amp
        self.dtype = dtype
        self.scaler = scaler
        self.warmup = warmup
        self.seen = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[torch.Tensor, torch.Tensor] | None = None
        self.static_out: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.side = torch.cuda.Stream()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _run(self, images: torch.Tensor, targets: Any, *, set_to_none: bool) -> tuple[torch.Tensor, dict]:
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.amp, cache_enabled=False):
            loss_dict = self.forward(images, targets)
        loss = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._backward(loss)
        return _detached(loss, loss_dict)

    def __call__(self, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        leaves, spec = tree_flatten(targets)
        if not all(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError("train.cuda_graph needs targets made of tensors only (a tensor, or e.g. detection's "
                            "padded {'boxes', 'labels'}); set train.cuda_graph=false for this task or data")
        if self.graph is not None:
            x, y = self.static_in
            static_leaves, static_spec = tree_flatten(y)
            if (images.shape == x.shape and spec == static_spec
                    and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(leaves, static_leaves))):
                x.copy_(images)
                for dst, src in zip(static_leaves, leaves):
                    dst.copy_(src)
                self.graph.replay()
                return self.static_out
            # another shape (a ragged batch): eager, zeroing the graph's gradient tensors in place
            return self._run(images, targets, set_to_none=False)
        if self.seen < self.warmup:
            self.seen += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self._run(images, targets, set_to_none=True)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        self.static_in = (images.clone(), tree_map(torch.clone, targets))
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate pinned memory meanwhile
        # (see GraphedInference._capture)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            with torch.autocast("cuda", dtype=self.dtype, enabled=self.amp, cache_enabled=False):
                loss_dict = self.forward(*self.static_in)
            loss = sum(loss_dict.values())
            self._backward(loss)
        self.static_out = _detached(loss, loss_dict)  # same storage: each replay rewrites them
        self.graph.replay()  # capture records without running: run this step now
        return self.static_out


class GraphedInference(nn.Module):
    """``model`` (a ``TaskModel`` / ``MultiTaskModel``) whose eval-mode ``forward_device`` part
    replays as one CUDA graph per input shape; ``model.finish`` then makes the usual outputs.

    Network and detection post-processing together are then one launch. Measured (H200, FCOS
    R18 at 256 px, batch 64, docs/BENCHMARKS.md "Detection"): 3.6k img/s
    against 2.9k for the eager device path; the eager network kernels (GroupNorm, copies) take
    most of the graph. With ``compile=True`` (inductor's fused kernels in the graph) 8.2k img/s,
    after 19.5 s of compile and capture. A shape is captured the ``capture_after``-th time
    it is seen, so one-off shapes (a ragged last batch, the aspect mode's sizes) stay eager
    and cost no capture; at most ``max_graphs`` shapes keep a graph (least recently used
    dropped). Outputs are copied out of the graph's buffers, so they outlive the next call.
    The wrapped model's training mode (not this wrapper's), CPU tensors and models without
    ``forward_device`` run ``model`` as it is.
    The weights are read where they lie at every replay: in-place updates (optimizer, EMA)
    are seen; replacing a parameter tensor is not (make a new wrapper).
    """

    def __init__(self, model: nn.Module, *, amp: bool, capture_after: int = 2, max_graphs: int = 4,
                 compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.amp = amp
        # compile: the device part through torch.compile (fixed shapes) before the capture, so the
        # graph replays inductor's fused kernels; the warm-up before each capture compiles
        self.compiled = torch.compile(model.forward_device, dynamic=False) if compile else None
        self.capture_after = capture_after
        self.max_graphs = max_graphs
        self.seen: dict[tuple, int] = {}
        self.graphs: OrderedDict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, Any]] = OrderedDict()

    def _device_part(self, images: torch.Tensor, compiled: bool = True) -> Any:
        fn = self.compiled if compiled and self.compiled is not None else self.model.forward_device
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return fn(images)

    def _capture(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, Any]:
        static_in = images.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN plans, lazy allocations, the points cache
            for _ in range(2):
                self._device_part(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the evaluation DataLoader's pin-memory thread allocates pinned buffers
        # meanwhile; under the default "global" mode that invalidated a capture on an H200
        # (cudaErrorStreamCaptureInvalidated, 2026-12-02). Only this thread's calls are checked.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._device_part(static_in)
        return static_in, graph, static_out

    def forward(self, images: torch.Tensor, targets: Any = None) -> Any:
        # the wrapped model's mode decides (this wrapper is built in training mode like any module)
        if (self.model.training or targets is not None or images.device.type != "cuda"
                or not hasattr(self.model, "forward_device")):
            return self.model(images, targets) if targets is not None else self.model(images)
        image_size = (images.shape[-2], images.shape[-1])
        key = (tuple(images.shape), tuple(images.stride()), images.dtype, images.device)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.capture_after:  # eager: compiling a one-off shape costs more
                return self.model.finish(self._device_part(images, compiled=False), image_size)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            entry = self.graphs[key] = self._capture(images)
        self.graphs.move_to_end(key)
        static_in, graph, static_out = entry
        static_in.copy_(images)
        graph.replay()
        outputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)
        return self.model.finish(outputs, image_size)


def inference_model(model: nn.Module, cfg: Any, device: torch.device) -> nn.Module:
    """What evaluation runs: with ``train.graph_eval`` on a GPU, ``GraphedInference(model)`` (the
    network and the device part of post-processing replayed as CUDA graphs, compiled first with
    ``train.compile_inference``); otherwise ``model``. ``train.cuda_graph`` (the training step)
    has no say here."""
    if cfg.train.graph_eval and device.type == "cuda" and hasattr(model, "forward_device"):
        return GraphedInference(model, amp=cfg.train.amp, compile=cfg.train.compile_inference)
    return model


def inference_models(cfg: Any, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """``inference_model`` for each model evaluated during a run (the weights, their EMA), each
    built once, so its captured graphs (and compiled code) are kept from one evaluation to the next."""
    made: dict[nn.Module, nn.Module] = {}

    def get(model: nn.Module) -> nn.Module:
        if model not in made:
            made[model] = inference_model(model, cfg, device)
        return made[model]
    return get

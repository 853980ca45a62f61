"""Several processes, one per GPU, under ``torchrun`` (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node=N -m tasks.<task> ...`` starts N copies of the task with
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment; ``init`` turns them into a
process group (NCCL on CUDA, one device per process: ``cuda:LOCAL_RANK``; gloo on the CPU).
Without those variables, or with ``WORLD_SIZE=1``, every helper here is a no-op and a plain
``python -m tasks.<task>`` runs exactly as a single process always has.

Rank 0 is the one that prints and writes the run folder; every rank trains on its own shard
of the data and evaluates its own shard of the validation set, and the metrics are reduced
across ranks (``all_reduce_sum`` of confusion matrices, ``gather_lists`` of COCO results).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["env_world_size", "resolve_device", "init", "destroy", "is_initialized", "rank", "world_size", "is_main",
           "barrier", "all_reduce", "all_reduce_sum", "all_gather_object", "broadcast_object", "gather_lists",
           "on_main", "main_first", "broadcast_buffers", "broadcast_module", "GradientAllReduce"]

T = TypeVar("T")
_state: dict[str, Any] = {"stdout": None}


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not started by ``torchrun``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (or nothing): CUDA when available, else the CPU; otherwise ``cpu``, ``cuda``,
    ``cuda:N``. A device this machine does not have is a ``ValueError`` saying so."""
    if spec in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec!r}: not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that prints, writes the run folder and evaluates COCO results."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the ``torchrun`` process group if ``WORLD_SIZE > 1``; returns the device to use.

    CUDA: NCCL, device ``cuda:LOCAL_RANK`` (a bare ``cuda`` / ``auto`` device means "my GPU").
    CPU: gloo. Other ranks than 0 get their standard output silenced (errors and warnings
    still reach stderr) until ``destroy``.
    """
    if env_world_size() <= 1 or is_initialized():
        return device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: start several "
                         f"processes with torchrun --nproc_per_node=N -m tasks.<task> ...")
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None and device.index != local:
            raise ValueError(f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK; "
                             f"pass --device cuda (or nothing)")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible: "
                             f"--nproc_per_node must not exceed the GPUs of the machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"torchrun with device {device}: use CUDA (NCCL) or the CPU (gloo)")
    if rank() != 0:
        _state["stdout"] = sys.stdout
        sys.stdout = open(os.devnull, "w")
    return device


def destroy() -> None:
    """Leave the process group (at exit, also after an error); a no-op without one."""
    if _state["stdout"] is not None:
        sys.stdout.close()
        sys.stdout, _state["stdout"] = _state["stdout"], None
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks (``op``: sum, min, max) and return it. The
    tensor must live on the process group's device kind (CUDA for NCCL)."""
    if is_initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks and return it (one process: unchanged)."""
    return all_reduce(tensor, "sum")


def all_gather_object(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small host data)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_lists(items: list) -> list:
    """Every rank's list concatenated in rank order, on every rank: e.g. the COCO results of
    each rank's validation shard, so that rank 0 scores the whole validation set."""
    if not is_initialized():
        return items
    return [x for part in all_gather_object(list(items)) for x in part]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only (e.g. COCOeval); every rank returns rank 0's result.
    An exception on rank 0 is raised on every rank (no rank is left waiting)."""
    if not is_initialized():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # sent to the other ranks, raised everywhere
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating or downloading a dataset), the others
    after it has finished (then finding the files in place)."""
    if not is_initialized():
        yield
        return
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s floating-point buffers (BatchNorm running statistics) to every
    rank. DDP keeps parameters equal but, with ``broadcast_buffers=False``, each rank's BN
    statistics follow its own batches: evaluation and checkpoints use rank 0's."""
    if not is_initialized():
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.broadcast(b, src)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does when it wraps a
    model): every rank starts from the same weights."""
    if not is_initialized():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


class GradientAllReduce:
    """Average ``.grad`` of ``params`` over the ranks: one all-reduce per dtype over a flat copy.

    For training steps that cannot run under DDP's autograd hooks: a CUDA-graphed forward +
    backward (``train.cuda_graph``) replays on the GPU, then this one call sums every rank's
    gradients (44 MB for the ResNet-18 classifier) before the optimizer step. Unlike DDP it does
    not overlap the reduction with backward. A parameter without a gradient gets zeros, so every
    rank reduces the same tensors in the same order.
    """

    def __init__(self, params) -> None:
        self.groups: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            if p.requires_grad:
                self.groups.setdefault(p.dtype, []).append(p)

    @torch.no_grad()
    def __call__(self) -> None:
        world = world_size()
        if world == 1:
            return
        for params in self.groups.values():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.mul_(1.0 / world)
            views = [v.view(g.shape) for v, g in zip(flat.split([g.numel() for g in grads]), grads)]
            torch._foreach_copy_(grads, views)

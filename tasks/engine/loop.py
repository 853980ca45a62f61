"""One train / evaluate loop for every task (torchvision ``references/engine.py`` in spirit).

The model's training forward returns a dict of named losses; the loop sums them, logs each
key, steps optimizer and schedule, keeps an optional EMA, evaluates, writes the run folder
(``metrics.jsonl``, ``curves.png``, ``last.pt`` / ``best.pt``) and resumes exactly.

Host syncs are kept out of the step: losses are accumulated on the device, and the training
guard (``guard.py``: non-finite values, a diverging loss, a frozen loss term, non-finite
weights, a validation metric stuck at zero) reads them every ``log_every`` steps and at the end
of each epoch, naming the first bad step; nothing is saved after it.

Under ``torchrun`` the model trains as ``DistributedDataParallel`` (one process per GPU, each
on its shard of the data, ``train.batch_size`` per GPU), or, with ``train.cuda_graph``, as
the graphed step followed by one flat gradient all-reduce; losses and image counts are reduced
across ranks at those same log points only; rank 0 alone writes ``metrics.jsonl``, curves and
checkpoints; evaluation runs on every rank's validation shard with rank 0's BatchNorm
statistics (what the checkpoint holds) and the task's ``evaluate`` reduces its metrics.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import (CKPT_FORMAT, CheckpointWriter, load_checkpoint, rng_state, seed_everything, set_rng_state,
                         remove_stale_temps, write_atomic)
from .config import config_to_dict
from .ema import ModelEMA
from .graphs import GraphedForwardBackward
from .guard import NonFiniteLossError, TrainingGuard, TrainingGuardError
from .logging import Console, MetricsLog, TensorBoardLog, format_metrics, progress
from .optim import build_grad_scaler, build_optimizer, build_scheduler, rebuild_scheduler
from .registry import TASKS, spec_for_checkpoint
from .viz import plot_curves

__all__ = ["NonFiniteLossError", "TrainingGuardError", "Trainer", "autocast", "unwrap", "seek_schedule", "Terminated",
           "stop_on_sigterm", "hold_signals", "config_diff"]

# optimizer settings the saved optimizer / schedule state carries: a resume with other values
# would silently keep the saved ones (or fail to load), so a difference is refused
OPTIM_STATE_KEYS = ("name", "lr", "momentum", "nesterov", "betas", "weight_decay", "norm_weight_decay",
                    "trunk_lr_mult", "schedule", "warmup_epochs", "final_lr_ratio")
_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, ``timeout``) raised in the main thread while
    ``stop_on_sigterm`` is active: a KeyboardInterrupt, so the run stops the same clean way as
    on Ctrl-C (checkpoint being written finished, lock released); ``run_cli`` exits 143."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers live there only


def _default_action(signum: int) -> None:
    """Do what ``signum`` does without a Python handler (forked children inherit the handlers
    below and must not turn a pool's SIGTERM into an exception)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises ``Terminated`` (the default action would kill the process
    mid-write, leaving the lock and possibly a half-finished epoch). No-op off the main thread."""
    if not _main_thread():
        yield
        return
    owner = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != owner:  # a forked child (a pool or DataLoader worker): the default action, as before
            _default_action(signum)
            return
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def hold_signals(note: str = "stopping: finishing the files being written (the run folder stays consistent)",
                 reraise: bool = True):
    """SIGINT and SIGTERM wait until the block ends: a second Ctrl-C while a checkpoint, its log
    line or the lock are being finished must not cut them short. A signal held while no exception
    is on its way out is raised at the end (KeyboardInterrupt / ``Terminated``; not with
    ``reraise=False``: the process is already stopping); while one is (the first Ctrl-C), it only
    says that the run is stopping. No-op off the main thread."""
    if not _main_thread():
        yield
        return
    received: list[int] = []
    owner = os.getpid()

    def hold(signum, frame):
        if os.getpid() != owner:  # a child forked inside the block
            _default_action(signum)
            return
        if not received:
            print(note, file=sys.stderr, flush=True)
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received and reraise and sys.exc_info()[0] is None:
            raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()


def _file_kind(path: Path) -> str | None:
    """What ``path`` recognisably is (a checkpoint, a picture, compressed data), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    kinds = {b"PK\x03\x04": "zip file (a PyTorch checkpoint?)", b"\x89PNG": "PNG image", b"\xff\xd8\xff": "JPEG image",
             b"\x1f\x8b": "gzip file", b"%PDF": "PDF file"}
    return next((kind for magic, kind in kinds.items() if head.startswith(magic)), None)


def config_diff(saved: dict[str, Any], current: dict[str, Any], section: str,
                keys: Iterable[str] | None = None) -> list[str]:
    """``"<section>.<key> <saved> in the checkpoint, <current> in this command"`` for each key of
    ``section`` (or of ``keys``) whose value differs; keys the checkpoint does not record (it
    predates them) are not differences."""
    a, b = saved.get(section) or {}, current.get(section) or {}
    names = list(keys) if keys is not None else list(b)
    out = []
    for k in names:
        if k not in a or k not in b:
            continue
        if json.dumps(a[k], sort_keys=True, default=str) != json.dumps(b[k], sort_keys=True, default=str):
            out.append(f"{section}.{k} {a[k]!r} in the checkpoint, {b[k]!r} in this command")
    return out


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


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The total 2-norm of the gradients, on the device (what ``clip_grad_norm_`` returns)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def seek_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Put a freshly built per-step schedule where ``step`` optimizer steps would have left it
    (setting the optimizer's lr / momentum). Resuming with another world size or batch size
    changes the steps per epoch, so the saved schedule state (step count, OneCycle's total)
    no longer fits; the schedule is a function of the step, so it is rebuilt and moved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended
        scheduler.last_epoch = step - 1
        scheduler.step()


@dataclass
class EpochResult:
    losses: dict[str, float]
    images: int
    seconds: float
    # the epoch that captured the CUDA-graph step: seconds from the epoch's start until the
    # captured step had run, and how many steps that took (warm-up, compile, capture included)
    extra: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Fits ``model`` on ``train_loader``, evaluating every ``train.eval_every`` epochs and at the end.

    Args:
        task: task name stored in checkpoints.
        cfg: the task's config dataclass (``.optim``, ``.train`` used here; stored whole).
        model: a task model (train mode with targets returns a loss dict).
        train_loader: iterable of ``(images, targets)`` already on ``device``; ``len()`` steps;
            optional ``set_epoch(epoch)``.
        evaluate: ``evaluate(model, final)`` with the model to evaluate (the EMA model when
            enabled; never the DDP wrapper) in eval mode under ``torch.no_grad`` and autocast;
            returns metrics. ``final``: write pictures / predictions (the last epoch, on rank 0
            only). Under ``torchrun`` every rank calls it on its validation shard and it must
            return metrics reduced across ranks (the same on every rank), making the same
            collective calls whatever ``final`` is.
        main_metric: key of ``evaluate``'s result that decides ``best.pt`` (higher is better).
        meta: stored in every checkpoint (class names, input normalisation, image size).
        targets_checked: the data already guarantees valid targets: the model's own target
            checks (``check_targets``, a host sync per step) are turned off. They are off under
            ``train.cuda_graph`` in any case (a captured step cannot sync).
    """

    def __init__(self, task: str, cfg: Any, model: nn.Module, train_loader: Iterable, *,
                 evaluate: Callable[[nn.Module, bool], dict[str, Any]], main_metric: str, output: str | Path,
                 device: torch.device, console: Console | None = None, quiet: bool = False,
                 meta: dict[str, Any] | None = None, targets_checked: bool = False) -> None:
        self.task, self.cfg = task, cfg
        self.device = device
        self.output = Path(output)
        self.main, self.world = distributed.is_main(), distributed.world_size()
        self.quiet = quiet or not self.main
        self.console = console or Console(self.quiet)
        self.train_loader = train_loader
        self.evaluate_fn = evaluate
        self.main_metric = main_metric
        self.meta = meta or {}
        tcfg, ocfg = cfg.train, cfg.optim
        self.epochs = tcfg.epochs
        self.amp = tcfg.amp and device.type == "cuda"
        self.amp_dtype = getattr(torch, tcfg.amp_dtype)

        self.model = model.to(device)  # the plain module: EMA, checkpoints, evaluation
        if targets_checked or (tcfg.cuda_graph and device.type == "cuda"):
            for m in self.model.modules():
                if hasattr(m, "check_targets"):
                    m.check_targets = False
        if tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        sync_bn = self._check_sync_bn()
        self.optimizer = build_optimizer(self.model, ocfg, device)
        # float16's narrow range needs loss scaling (None for bf16 / fp32)
        self.scaler = build_grad_scaler(self.optimizer, self.amp_dtype, device) if self.amp else None
        self.train_model = self.model  # what the training step calls: DDP-wrapped with several ranks
        cuda_graph = tcfg.cuda_graph and device.type == "cuda"
        if cuda_graph and self.world > 1 and sync_bn:
            self.console("train.cuda_graph is off with model.norm=syncbn (its collectives run inside the forward)")
            cuda_graph = False
        self.grad_sync: distributed.GradientAllReduce | None = None
        if self.world > 1 and cuda_graph:
            # DDP's all-reduce runs from autograd hooks on its own stream, which a CUDA graph
            # cannot capture: the graphed step replays forward + backward, then the gradients
            # are averaged in one flat all-reduce (no overlap with backward; for the small
            # models graphs are for, launch overhead is the larger cost).
            distributed.broadcast_module(self.model)
            self.grad_sync = distributed.GradientAllReduce(self.model.parameters())
            self._seed_rank_rngs(0)
        elif self.world > 1:
            # Every rank starts from rank 0's weights (DDP broadcasts them). BatchNorm running
            # statistics are not used by the training forward: rather than broadcasting them
            # before every step, evaluation copies rank 0's (see evaluate()).
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            no_buffer_sync = ({"forward_sync_buffers": False}  # broadcast_buffers' newer name
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                       **no_buffer_sync)
            # On the first step a 1x1 conv's weight gradient may come with other strides on its
            # size-1 dims than the bucket view: the same memory layout, one copy, then aliased.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self._seed_rank_rngs(0)
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set gives no batch: is it empty, or smaller than the batch size?")
        self.scheduler = build_scheduler(self.optimizer, ocfg, self.epochs, self.steps_per_epoch)
        self.guard = TrainingGuard(enabled=tcfg.guard, device=device, steps_per_epoch=self.steps_per_epoch,
                                   warmup_steps=int(round(ocfg.warmup_epochs * self.steps_per_epoch)), lr=ocfg.lr,
                                   output=self.output, check_grad_norm=self.scaler is None)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None
        if ocfg.ema:
            self.ema = ModelEMA(self.model, ocfg.ema_decay)  # BN statistics averaged too
        if tcfg.compile_tune and not tcfg.compile:
            raise ValueError("train.compile_tune tunes torch.compile's kernels: it needs train.compile=true")
        # torch.compile wraps the DDP module (PyTorch's recipe: DDP's optimizer splits the graph
        # at gradient-bucket boundaries so the all-reduce still overlaps backward)
        self.step_model = self.train_model
        if tcfg.compile_cache and not tcfg.compile:
            raise ValueError("train.compile_cache stores torch.compile's artifacts: it needs train.compile=true")
        self._compile_cache_out: Path | None = None  # written after the first epoch: a file that did not load
        if tcfg.compile and tcfg.compile_cache and not self._load_compile_cache(Path(tcfg.compile_cache)):
            self._compile_cache_out = Path(tcfg.compile_cache)
        if tcfg.compile:
            # coordinate-descent tuning searches block sizes of inductor's Triton kernels (the
            # BatchNorm / ReLU / residual work): ResNet-50 bs 256 kernel time -8% on an H200
            self.step_model = torch.compile(self.train_model, options={"coordinate_descent_tuning": True}
                                            if tcfg.compile_tune else None)
        self.graphed = None
        if cuda_graph:
            # the graph captures the compiled kernels when train.compile is on (the warm-up steps
            # before capture compile forward and backward); with graphs the model is never DDP
            self.graphed = GraphedForwardBackward(self.step_model, self.optimizer, amp=self.amp,
                                                  dtype=self.amp_dtype, scaler=self.scaler)
        self.log = MetricsLog(self.output / "metrics.jsonl")  # written by rank 0 only
        self.tensorboard = TensorBoardLog(self.output / "tensorboard") if tcfg.tensorboard and self.main else None
        self.writer = CheckpointWriter()
        self.start_epoch = 0
        self.best: float | None = None
        self._last_plot = 0.0
        # what an interrupted run can be resumed from: the epoch <output>/last.pt holds (set once
        # a checkpoint and its log line are on disk, or by resume() from that file), and the
        # epoch in progress (1-based)
        self.saved_epoch: int | None = None
        self.best_saved_epoch: int | None = None  # best.pt written by this run (newer than last.pt with save_every > 1)
        self.current_epoch: int | None = None

    def _check_sync_bn(self) -> bool:
        """Whether the model has SyncBatchNorm layers (an error where they cannot work)."""
        if not any(isinstance(m, nn.SyncBatchNorm) for m in self.model.modules()):
            return False
        if self.world == 1:
            self.console("model.norm=syncbn in one process: plain batch norm (SyncBatchNorm synchronises "
                         "statistics only across the processes of torchrun)")
        elif self.device.type != "cuda":
            raise ValueError("model.norm=syncbn needs CUDA devices under torchrun (PyTorch's SyncBatchNorm has "
                             "no CPU / gloo implementation): use model.norm=bn or gn")
        return True

    def _training_batch_norms(self) -> list[str]:
        """Names of the BatchNorm layers that normalise with batch statistics in training (not
        frozen ones, nor SyncBatchNorm across several processes, whose batch spans the ranks)."""
        model = unwrap(self.model)
        was = model.training
        model.train()  # frozen stages stay in eval mode (ResNet.train)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.training and not (isinstance(m, nn.SyncBatchNorm) and self.world > 1)]
        model.train(was)
        return names

    @contextlib.contextmanager
    def _one_image_batches(self, step: int, epoch: int, images: torch.Tensor):
        """PyTorch's "Expected more than 1 value per channel" as one line naming the batch size.
        Not refused up front: BatchNorm trains on one image whenever its input has more than one
        pixel per channel (dense tasks at batch 1, a one-image overfit check); it fails only
        where a feature map is 1x1 (ResNet's C5 of a 28x28 image through the ImageNet stem)."""
        try:
            yield
        except ValueError as e:
            if _ONE_VALUE_PER_CHANNEL not in str(e):
                raise
            raise self._one_image_batch_error(
                f"training batch {step + 1} of epoch {epoch + 1} holds {images.shape[0]} image",
                "use train.batch_size (--batch-size) >= 2 with no batch of one image") from None

    def _one_image_batch_error(self, detail: str, fix: str) -> ValueError:
        bn = self._training_batch_norms()
        if bn and all(n.startswith("backbone.") for n in bn):
            fix += ", or set model.norm=gn / frozen_bn (no batch statistics)"
        elif bn:  # the segmentation head's BatchNorm, say: model.norm does not change it
            fix += f" (the {bn[0].split('.')[0]}'s BatchNorm layers need it whatever model.norm is)"
        return ValueError(f"{detail}: BatchNorm cannot train on a batch of one image (one value per channel); {fix}")

    def _seed_rank_rngs(self, epoch: int) -> None:
        """Ranks other than 0 draw dropout / drop-path / augmentation noise from global RNG
        streams of their own (rank 0 keeps the one-process stream)."""
        if self.world > 1 and not self.main:
            seed_everything(self.cfg.train.seed * 1_000_003 + epoch * 7919 + 104_729 * distributed.rank())

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "task": self.task,
            "config": config_to_dict(self.cfg),
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_steps": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "steps_per_epoch": self.steps_per_epoch,  # per rank: a resume with another world size re-seeks the schedule
            "world_size": self.world,
            "metrics": metrics,
            "best": self.best,
            "rng": rng_state(),  # rank 0's
            "meta": self.meta,  # what inference needs without the data: class names, normalisation
        }

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, EMA, epoch and RNG.

        Every rank reads the same file. A checkpoint written with N processes resumes with M:
        weights and optimizer state do not depend on the world size; the schedule is moved to
        the step this world size would have reached. Only rank 0's RNG state is stored, so a
        resumed run is bit-identical to an uninterrupted one in one process; with several
        processes the other ranks' global RNG streams are reseeded (data order and on-device
        augmentation are reseeded from (seed, epoch, rank) anyway).

        More ``train.epochs`` than the checkpoint's run had: the schedule is rebuilt for the new
        length and continues at the step reached (said in one line). Fewer epochs than it has
        trained, another optimizer or schedule setting (``OPTIM_STATE_KEYS``), or a model whose
        weights do not fit the checkpoint's: a ``ValueError`` naming the keys and both values,
        before anything is loaded or written."""
        ckpt = load_checkpoint(path)
        if ckpt.get("task") != self.task:
            raise ValueError(f"{path} is a {ckpt.get('task')!r} checkpoint, not {self.task!r}")
        if self.task in TASKS:
            spec_for_checkpoint(ckpt, path)  # fills in what an older checkpoint's config lacks
        saved_cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        current = config_to_dict(self.cfg)
        start = int(ckpt["epoch"])
        if start > self.epochs:
            raise ValueError(f"train.epochs (--epochs) {self.epochs} is fewer than the {start} epochs --resume {path} "
                             f"has trained: pass --epochs {start + 1} or more to continue it (--eval-only --weights "
                             f"{path} evaluates it)")
        differs = config_diff(saved_cfg, current, "optim", OPTIM_STATE_KEYS)
        if differs:
            raise ValueError(f"--resume {path}: the checkpoint's optimizer settings differ from this command's: "
                             f"{'; '.join(differs)}; resume with the checkpoint's settings (drop those --set / "
                             f"flags), or start a new run from its weights with --trunk {path}")
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError:
            raise ValueError(self._model_mismatch(path, ckpt, saved_cfg, current)) from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # another parameter grouping (freeze_at, ...)
            differs = config_diff(saved_cfg, current, "model") + config_diff(saved_cfg, current, "optim")
            why = "; ".join(differs) or (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--resume {path}: the checkpoint's optimizer state does not fit this command's "
                             f"model and optimizer: {why}; resume with the checkpoint's settings") from None
        if self.scaler is not None and ckpt.get("grad_scaler"):  # else (a bf16 run's file): a fresh scale
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.start_epoch = start
        saved_steps = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        saved_epochs = (saved_cfg.get("train") or {}).get("epochs", self.epochs)
        if saved_steps == self.steps_per_epoch and saved_epochs == self.epochs:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:
            # The saved schedule (its length, OneCycle's total) no longer fits: the schedule is a
            # function of the step, so a fresh one for this run's length is moved to the step reached.
            self.scheduler = rebuild_scheduler(self.optimizer, self.model, self.cfg.optim, self.epochs,
                                               self.steps_per_epoch)
            seek_schedule(self.scheduler, self.start_epoch * self.steps_per_epoch)
            where = (f"the schedule continues at step {self.start_epoch * self.steps_per_epoch} of "
                     f"{self.epochs * self.steps_per_epoch}")
            if saved_steps != self.steps_per_epoch:
                self.console(f"{path}: {saved_steps} steps per epoch with {ckpt.get('world_size', 1)} process(es), "
                             f"now {self.steps_per_epoch} with {self.world}: {where}")
            if saved_epochs != self.epochs:
                self.console(f"{path}: train.epochs {saved_epochs} in the checkpoint, {self.epochs} now: the "
                             f"learning-rate schedule is rebuilt for {self.epochs} epochs and {where}")
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError(f"{path} has no EMA weights but optim.ema is on")
            self.ema.load_state_dict(ckpt["ema"], ckpt.get("ema_steps", 0))
        self.best = ckpt.get("best")
        set_rng_state(ckpt["rng"])
        self._seed_rank_rngs(self.start_epoch)
        if Path(path).resolve() == (self.output / "last.pt").resolve():
            self.saved_epoch = self.start_epoch  # an interrupt before the next save can resume from it again
        if self.main:
            self.log.truncate_after(self.start_epoch)
        self.console(f"resumed from {path} after epoch {self.start_epoch}/{self.epochs}")

    def _model_mismatch(self, path: str | Path, ckpt: dict[str, Any], saved_cfg: dict[str, Any],
                        current: dict[str, Any]) -> str:
        """One line for a checkpoint whose weights do not fit the model: the config keys that
        differ, else the classes, else the first tensors that do not match."""
        head = f"--resume {path}: the checkpoint's model differs from this command's"
        hint = (f"; resume with the checkpoint's settings (drop those --set / flags), or start a new run from "
                f"its trunk with --trunk {path}")
        differs = config_diff(saved_cfg, current, "model")
        if differs:
            return f"{head}: {'; '.join(differs)}{hint}"
        saved_names = (ckpt.get("meta") or {}).get("class_names")
        names = self.meta.get("class_names")
        if saved_names is not None and names is not None and list(saved_names) != list(names):
            return (f"{head}: it predicts {len(saved_names)} classes ({', '.join(map(str, saved_names[:4]))}"
                    f"{', ...' if len(saved_names) > 4 else ''}), this data has {len(names)} "
                    f"({', '.join(map(str, names[:4]))}{', ...' if len(names) > 4 else ''}){hint}")
        mine, theirs = unwrap(self.model).state_dict(), ckpt["model"]
        missing = [k for k in mine if k not in theirs]
        unexpected = [k for k in theirs if k not in mine]
        shapes = [f"{k} {list(theirs[k].shape)} vs {list(mine[k].shape)}" for k in mine
                  if k in theirs and hasattr(theirs[k], "shape") and theirs[k].shape != mine[k].shape]
        parts = ([f"shapes differ ({', '.join(shapes[:2])})"] if shapes else []) + \
                ([f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
        return f"{head}: {'; '.join(parts) or 'its weights do not load'}{hint}"

    # ------------------------------------------------------------------ loop
    def train_one_epoch(self, epoch: int) -> EpochResult:
        model, opt, sched = self.step_model, self.optimizer, self.scheduler
        model.train()
        clip = self.cfg.optim.clip_grad_norm
        log_every = max(1, self.cfg.train.log_every)
        guard = self.guard
        sums: torch.Tensor | None = None
        keys: list[str] = []
        n_images = 0
        totals: torch.Tensor | None = None  # [loss sums..., images] of all ranks, at the last log point
        bar = progress(self.train_loader, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}",
                       quiet=self.quiet)
        extra: dict[str, float] = {}
        capturing = self.graphed is not None and self.graphed.graph is None
        start = time.perf_counter()
        for step, (images, targets) in enumerate(bar):
            if self.graphed is not None:
                with self._one_image_batches(step, epoch, images):
                    loss, loss_dict = self.graphed(images, targets)
                if self.grad_sync is not None:
                    self.grad_sync()
                if capturing and self.graphed.graph is not None:  # once per run: one sync
                    torch.cuda.synchronize(self.device)
                    extra = {"capture_s": time.perf_counter() - start, "capture_steps": step + 1}
                    capturing = False
            else:
                with autocast(self.device, self.amp, self.amp_dtype), self._one_image_batches(step, epoch, images):
                    loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
                # DDP: the gradients are views into its all-reduce buckets; zeroing them in place
                # keeps them so (set to None, each step would allocate and copy them again)
                opt.zero_grad(set_to_none=self.world == 1)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if not keys:
                keys = list(loss_dict)
                sums = torch.zeros(len(keys) + 1, device=self.device)
            grad_norm = None
            if clip:
                if self.scaler is not None:
                    self.scaler.unscale_(opt)  # clip the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, clip, foreach=True)
            elif guard.check_grad_norm:
                grad_norm = _grad_norm(self._params)
            lr = opt.param_groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            sched.step()
            if self.ema is not None:
                self.ema.update(self.model)
            values = torch.stack([loss.detach().float()] + [loss_dict[k].detach().float() for k in keys])
            sums += values
            guard.step(epoch, step, values, keys, grad_norm, float(lr))  # device work only
            n_images += images.shape[0]
            if (step + 1) % log_every == 0 or step + 1 == self.steps_per_epoch:
                if self.world > 1:
                    totals = self._reduce_log_point(sums, n_images, epoch)
                else:
                    guard.log_point(epoch)  # the sync: raises on a non-finite or diverging loss
                if not bar.disable:
                    loss = float(totals[0]) / self.world if totals is not None else float(sums[0])
                    bar.set_postfix(loss=f"{loss / (step + 1):.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if totals is not None:  # the last step is a log point: every rank's sums and images
            sums, n_images = totals[:-1] / self.world, int(totals[-1])
        frozen = guard.frozen_flag()
        if frozen is not None and self.world > 1:  # every rank stops, or none
            frozen = distributed.all_reduce(frozen.float(), "max") > 0
        guard.end_epoch(epoch, frozen)
        means = (sums / max(1, self.steps_per_epoch)).tolist() if sums is not None else [math.nan]
        losses = {"loss": means[0], **{f"loss_{k}": v for k, v in zip(keys, means[1:])}}
        return EpochResult(losses, n_images, seconds, extra)

    def _reduce_log_point(self, sums: torch.Tensor, n_images: int, epoch: int) -> torch.Tensor:
        """One all-reduce of ``[loss sums..., images, guard flag]`` over the ranks; every rank
        raises if any rank's guard tripped (no rank is left waiting in a collective), naming the
        first non-finite step of all ranks."""
        packed = torch.cat([sums.double(), torch.tensor([n_images, 0.0], dtype=torch.float64, device=sums.device)])
        packed[-1] = self.guard.log_flag().double()
        distributed.all_reduce_sum(packed)
        first_bad = None
        if float(packed[-1]) > 0:
            never = torch.iinfo(torch.int64).max
            bad = self.guard.first_bad
            first_bad = distributed.all_reduce(torch.where(bad >= 0, bad, never), "min")
            first_bad = torch.where(first_bad == never, -1, first_bad)
        self.guard.log_point(epoch, packed[-1], first_bad)
        return packed[:-1]

    def _trained_state(self) -> dict[str, Any]:
        """What a checkpoint would hold of the training: weights, BN statistics, EMA, optimizer."""
        return {"model": unwrap(self.model).state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict()["state"]}

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, Any]:
        model = self.eval_model
        model.eval()
        distributed.broadcast_buffers(model)  # every rank evaluates the weights rank 0 saves
        with autocast(self.device, self.amp):
            metrics = self.evaluate_fn(model, final and self.main)
        self.model.train()
        return metrics

    def _load_compile_cache(self, path: Path) -> bool:
        """Pre-fill inductor's caches from ``path`` (``torch.compiler.load_cache_artifacts``), for a
        run on the same torch / GPU to skip compile work. A file that does not load (another torch
        version, damaged) is reported and ignored: the run compiles as usual and rewrites it. True
        when it loaded: a loaded file is never rewritten (it may be one shipped with the project)."""
        if path.is_dir():
            raise ValueError(f"train.compile_cache {path} is a folder: point it at a file (written after the first "
                             "epoch)")
        if not path.is_file():
            self.console(f"train.compile_cache: {path} does not exist yet; it is written after the first epoch")
            return False
        kind = _file_kind(path)
        if kind is not None:  # a file that did not load is rewritten: never a user's checkpoint or picture
            raise ValueError(f"train.compile_cache {path} is a {kind}, not a torch.compile cache: it would be "
                             "overwritten after the first epoch; point train.compile_cache at another file")
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - any failure only costs the compile it would have saved
            self.console.error(f"train.compile_cache: {path} was not loaded ({type(e).__name__}: {e}); "
                               "compiling, and rewriting it after the first epoch")
            return False
        self.console(f"train.compile_cache: loaded {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return True

    def _save_compile_cache(self, path: Path) -> None:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:  # nothing was compiled in this process
            return
        write_atomic(path, lambda tmp: tmp.write_bytes(artifacts[0]))

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last epoch's record (plus ``best_*``)."""
        tcfg = self.cfg.train
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.output)  # of writes killed with an earlier run
            if self.start_epoch == 0:  # a fresh run: lines of one that never saved a checkpoint go
                self.log.truncate_after(0)
        self.records = self.log.records() if self.main else []
        record: dict[str, Any] = {}
        total_train_s = sum(r.get("train_time_s", 0.0) for r in self.records)
        try:
            for epoch in range(self.start_epoch, self.epochs):
                self.current_epoch = epoch + 1
                if hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(epoch)
                result = self.train_one_epoch(epoch)
                total_train_s += result.seconds
                # before evaluating or saving: weights, BN statistics, EMA and optimizer all finite
                self.guard.check_state(self._trained_state(), epoch)
                if epoch == self.start_epoch and self._compile_cache_out is not None and self.main:
                    self._save_compile_cache(self._compile_cache_out)  # compiled by now (outside the timing)
                loader_stats = getattr(self.train_loader, "epoch_stats", dict)()  # e.g. the padding fraction
                record = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                          **{f"train_{k}": v for k, v in result.losses.items()},
                          "train_images": result.images, "train_time_s": result.seconds,
                          "train_time_total_s": total_train_s,
                          "train_img_per_s": result.images / max(result.seconds, 1e-9),
                          **{f"train_{k}": v for k, v in result.extra.items()},
                          **{f"train_{k}": v for k, v in loader_stats.items()}}
                if self.world > 1:  # train_images and img/s count every rank's images
                    record["world_size"] = self.world
                last = epoch + 1 == self.epochs
                if last or (epoch + 1) % max(1, tcfg.eval_every) == 0:
                    t0 = time.perf_counter()
                    metrics = self.evaluate(final=last)
                    record.update({f"val_{k}": v for k, v in metrics.items()})
                    record["eval_time_s"] = time.perf_counter() - t0
                main = record.get(f"val_{self.main_metric}")  # reduced: the same on every rank
                if f"val_{self.main_metric}" in record:
                    self.guard.check_metric(epoch, self.main_metric, main, (epoch + 1) * self.steps_per_epoch)
                is_best = main is not None and (self.best is None or main > self.best)
                if is_best:
                    self.best = main
                # best.pt before last.pt: a kill between them leaves a last.pt whose best is on disk
                paths = [self.output / "best.pt"] if is_best else []
                if last or (epoch + 1) % max(1, tcfg.save_every) == 0:
                    paths.append(self.output / "last.pt")
                if self.main:
                    self.records.append(record)
                    saves_last = any(p.name == "last.pt" for p in paths)

                    def log_line(r=record, saves_last=saves_last, saves_best=is_best):
                        self.log.append(r)
                        if saves_last:  # last.pt and its line are on disk: what an interrupt can resume from
                            self.saved_epoch = r["epoch"]
                        if saves_best:
                            self.best_saved_epoch = r["epoch"]

                    if paths:  # the log line once the checkpoints are on disk: never ahead of them
                        self.writer.save(self.state_dict(epoch + 1, record), *paths, then=log_line)
                    else:
                        self.writer.wait()  # keep the lines in epoch order
                        log_line()
                    if self.tensorboard is not None:
                        self.tensorboard.append(record)
                    self._plot(force=last)
                self.console(f"epoch {epoch + 1}/{self.epochs}  " + format_metrics(
                    record, ["train_loss", f"val_{self.main_metric}", "train_img_per_s", "train_time_s"]))
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
            # The checkpoint being written and its log line are finished (a second Ctrl-C waits
            # for them); then lines of epochs that no checkpoint holds go (train.save_every > 1):
            # the log is never ahead of the checkpoints a resume can start from.
            with hold_signals():
                self.writer.wait()
                if self.main:
                    self._drop_unsaved_epochs(max(self.saved_epoch or 0, self.best_saved_epoch or 0))
            raise
        finally:
            with hold_signals():
                self.writer.wait()
                if self.tensorboard is not None:
                    self.tensorboard.close()
        if not record:  # resumed a finished run: nothing trained, still report
            record = {"epoch": self.start_epoch, **{f"val_{k}": v for k, v in self.evaluate(final=True).items()}}
        if self.best is not None:
            record[f"best_{self.main_metric}"] = self.best
        return record

    def _drop_unsaved_epochs(self, kept: int) -> None:
        """After an interrupt: log lines (and curves) of epochs after ``kept`` go, since no
        checkpoint holds them. With no epoch left the curves were this run's alone (a folder
        holding another run's results is refused or cleared first), so the picture goes too."""
        self.log.truncate_after(kept)
        if not any(r.get("epoch", 0) > kept for r in getattr(self, "records", [])):
            return
        self.records = [r for r in self.records if r.get("epoch", 0) <= kept]
        if self.records:
            self._plot(force=True)
        else:
            (self.output / "curves.png").unlink(missing_ok=True)

    def _plot(self, force: bool) -> None:
        # Redrawing costs ~0.2 s of host time: at most every 15 s, and at the end.
        now = time.perf_counter()
        if force or now - self._last_plot > 15:
            plot_curves(self.records, self.output / "curves.png", main_metric=self.main_metric)
            self._last_plot = now

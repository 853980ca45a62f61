"""One train / evaluate loop for every task (torchvision ``references/engine.py`` in spirit).

The model's training forward returns a dict of named losses; the loop sums them, logs each
key, and resumes exactly. The pieces, each in one place:

* ``step.py``: forward + backward per mode (eager, ``torch.compile``, CUDA graph; under
  ``torchrun`` the DDP module, or the graphed step and one flat gradient all-reduce);
* ``updater.py``: clipping, optimizer step (GradScaler under float16), per-step schedule, EMA;
* ``callbacks.py``: evaluation, the guard's end-of-epoch checks, early stopping
  (``train.patience``), ``best.pt`` / ``last.pt`` and the ``metrics.jsonl`` line after them,
  ``curves.png``, console / TensorBoard, the compile cache;
* here: the ``Trainer`` that builds them, the epoch loop, ``fit``, checkpoint state and ``resume``.

``train.accumulate`` K: the step runs on K batches (micro-batches) per optimizer step, each
backpropagating its loss / K (DDP: all-reducing on the last only); the updater then steps once.
An epoch of B batches makes ceil(B / K) optimizer steps: its last group may be shorter and
steps too (its losses / its size), so no batch is dropped. Everything after the step counts
optimizer steps: the schedule's length, the guard, ``train.log_every``, the progress line, the
loss a step logs (the mean of its group's), ``steps_per_epoch`` in checkpoints.

Host syncs are kept out of the step: losses are accumulated on the device, and the training
guard (``guard.py``: non-finite values, a diverging loss, a frozen loss term, non-finite
weights, a validation metric stuck at zero) reads them every ``log_every`` steps and at the end
of each epoch, naming the first bad step; nothing is saved after it.

Under ``torchrun`` each process trains on its shard of the data (``train.batch_size`` per GPU);
losses and image counts are reduced across ranks at those same log points only; rank 0 alone
writes ``metrics.jsonl``, curves and checkpoints; evaluation runs on every rank's validation
shard with rank 0's BatchNorm statistics (what the checkpoint holds) and the task's
``evaluate`` reduces its metrics.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import distributed
from .callbacks import (Callback, Checkpoints, CompileCache, Curves, EarlyStopping, EpochResult, Evaluation,
                        GuardChecks, Logging)
from .checkpoint import CKPT_FORMAT, CheckpointWriter, load_checkpoint, rng_state, seed_everything, set_rng_state
from .config import config_to_dict
from .ema import ModelEMA
from .guard import NonFiniteLossError, TrainingGuard, TrainingGuardError
from .logging import Console, MetricsLog, PlainProgress, TensorBoardLog, progress
from .optim import build_grad_scaler, build_optimizer, build_scheduler, rebuild_scheduler
from .registry import TASKS, spec_for_checkpoint
from .signals import Terminated, hold_signals, stop_on_sigterm
from .step import autocast, build_step, check_sync_bn, one_image_batches, unwrap
from .updater import OptimizerStateError, Updater, seek_schedule

__all__ = ["NonFiniteLossError", "TrainingGuardError", "Trainer", "autocast", "unwrap", "seek_schedule", "Terminated",
           "stop_on_sigterm", "hold_signals", "config_diff", "settings_for_run"]

# optimizer settings the saved optimizer / schedule state carries: a resume with other values
# would silently keep the saved ones (or fail to load), so a difference is refused
OPTIM_STATE_KEYS = ("name", "lr", "momentum", "nesterov", "weight_decay", "trunk_lr_mult", "schedule", "warmup_epochs")


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


class EpochLosses:
    """An epoch's loss sums and image count, on the device, and the guard's per-step check.

    Read only at log points: in one process the guard's sync; under torchrun one all-reduce of
    ``[loss sums..., images, guard flag]``, so every rank raises if any rank's guard tripped (no
    rank is left waiting in a collective), naming the first non-finite step of all ranks."""

    def __init__(self, guard: TrainingGuard, device: torch.device, world: int, epoch: int) -> None:
        self.guard, self.device, self.world, self.epoch = guard, device, world, epoch
        self.keys: list[str] = []
        self.sums: torch.Tensor | None = None
        self.images = 0
        self.totals: torch.Tensor | None = None  # [loss sums..., images] of all ranks, at the last log point

    def values(self, loss: torch.Tensor, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[loss, *terms]`` of one batch, float32 on the device (no sync)."""
        if not self.keys:
            self.keys = list(loss_dict)
            self.sums = torch.zeros(len(self.keys) + 1, device=self.device)
        return torch.stack([loss.detach().float()] + [loss_dict[k].detach().float() for k in self.keys])

    def add(self, step: int, values: torch.Tensor, images: int, grad_norm: torch.Tensor | None, lr: float) -> None:
        """One optimizer step's ``values`` (its group's mean under ``train.accumulate``). Device work only."""
        self.sums += values
        self.guard.step(self.epoch, step, values, self.keys, grad_norm, float(lr))
        self.images += images

    def log_point(self) -> None:
        """The sync: raises on a non-finite or diverging loss (of any rank)."""
        if self.world == 1:
            self.guard.log_point(self.epoch)
            return
        packed = torch.cat([self.sums.double(),
                            torch.tensor([self.images, 0.0], dtype=torch.float64, device=self.sums.device)])
        packed[-1] = self.guard.log_flag().double()
        distributed.all_reduce_sum(packed)
        first_bad = None
        if float(packed[-1]) > 0:
            never = torch.iinfo(torch.int64).max
            bad = self.guard.first_bad
            first_bad = distributed.all_reduce(torch.where(bad >= 0, bad, never), "min")
            first_bad = torch.where(first_bad == never, -1, first_bad)
        self.guard.log_point(self.epoch, packed[-1], first_bad)
        self.totals = packed[:-1]

    def mean_loss(self, steps: int) -> float:
        """The mean loss of the first ``steps`` steps (for the progress bar; a sync)."""
        loss = float(self.totals[0]) / self.world if self.totals is not None else float(self.sums[0])
        return loss / steps

    def end_epoch(self, steps: int) -> tuple[dict[str, float], int]:
        """The mean of every loss key over ``steps`` and the image count (every rank's), after the
        guard's end-of-epoch check (a frozen term stops every rank, or none)."""
        sums, images = self.sums, self.images
        if self.totals is not None:  # the last step is a log point: every rank's sums and images
            sums, images = self.totals[:-1] / self.world, int(self.totals[-1])
        frozen = self.guard.frozen_flag()
        if frozen is not None and self.world > 1:
            frozen = distributed.all_reduce(frozen.float(), "max") > 0
        self.guard.end_epoch(self.epoch, frozen)
        means = (sums / max(1, steps)).tolist() if sums is not None else [math.nan]
        return {"loss": means[0], **{f"loss_{k}": v for k, v in zip(self.keys, means[1:])}}, images


def steps_per_epoch(train_loader: Any, accumulate: int = 1) -> int:
    """Optimizer steps in one epoch of ``train_loader``: one per ``accumulate`` batches."""
    return math.ceil(len(train_loader) / max(1, accumulate))


def settings_for_run(spec: Any, cfg: Any, train_loader: Any) -> list[str]:
    """The task's settings that depend on the run's length (``TaskSpec.resolve_for_run``:
    detection's ``auto`` box head) fixed in ``cfg`` for ``cfg.train.epochs`` epochs of
    ``train_loader``; one line per setting it fixed."""
    if spec.resolve_for_run is None:
        return []
    return spec.resolve_for_run(cfg, steps_per_epoch(train_loader, cfg.train.accumulate) * cfg.train.epochs)


class Trainer:
    """Fits ``model`` on ``train_loader``, evaluating every ``train.eval_every`` epochs and at the end.

    Args:
        task: task name stored in checkpoints.
        cfg: the task's config dataclass (``.optim``, ``.train`` used here; stored whole).
        model: a task model (train mode with targets returns a loss dict).
        train_loader: iterable of ``(images, targets)`` already on ``device``; ``len()`` batches
            (``train.accumulate`` of them per optimizer step); optional ``set_epoch(epoch)``.
        evaluate: ``evaluate(model, final)`` with the model to evaluate (the EMA model when
            enabled; never the DDP wrapper) in eval mode under ``torch.no_grad`` and autocast;
            returns metrics. ``final``: write pictures / predictions (the last epoch, or the one
            ``train.patience`` ends the run at, evaluated once more; on rank 0 only). Under
            ``torchrun`` every rank calls it on its validation shard and it must return metrics
            reduced across ranks (the same on every rank), making the same collective calls
            whatever ``final`` is.
        main_metric: key of ``evaluate``'s result that decides ``best.pt`` (higher is better).
        meta: stored in every checkpoint (class names, input normalisation, image size).
        targets_checked: the data already guarantees valid targets: the model's own target
            checks (``check_targets``, a host sync per step) are turned off. They are off under
            ``train.cuda_graph`` in any case (a captured step cannot sync).

    ``step`` (``step.py``), ``updater`` (``updater.py``) and ``callbacks`` (``callbacks.py``, in
    the order they run) are the pieces; ``optimizer``, ``scheduler``, ``scaler`` and ``ema`` are
    the updater's.
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
        if tcfg.accumulate < 1:  # the config refuses it too; a Trainer built in Python is told here
            raise ValueError(f"train.accumulate={tcfg.accumulate}: batches per optimizer step, 1 or more")
        self.accumulate = tcfg.accumulate
        self.amp = tcfg.amp and device.type == "cuda"
        self.amp_dtype = getattr(torch, tcfg.amp_dtype)

        self.model = model.to(device)  # the plain module: EMA, checkpoints, evaluation
        if targets_checked or (tcfg.cuda_graph and device.type == "cuda"):
            for m in self.model.modules():
                if hasattr(m, "check_targets"):
                    m.check_targets = False
        if tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        sync_bn = check_sync_bn(self.model, self.world, device, self.console)
        optimizer = build_optimizer(self.model, ocfg, device)
        # float16's narrow range needs loss scaling (None for bf16 / fp32)
        scaler = build_grad_scaler(optimizer, self.amp_dtype, device) if self.amp else None
        compile_cache = CompileCache.from_config(tcfg, self.console)  # loaded before anything compiles
        self.step = build_step(self.model, optimizer, tcfg, device, amp=self.amp, dtype=self.amp_dtype, scaler=scaler,
                               world=self.world, sync_bn=sync_bn, console=self.console)
        self._seed_rank_rngs(0)
        if len(train_loader) == 0:
            raise ValueError("the training set gives no batch: is it empty, or smaller than the batch size?")
        # optimizer steps: the schedule, the guard, log points and checkpoints count these
        self.steps_per_epoch = steps_per_epoch(train_loader, self.accumulate)
        self.guard = TrainingGuard(enabled=tcfg.guard, device=device, steps_per_epoch=self.steps_per_epoch,
                                   warmup_steps=int(round(ocfg.warmup_epochs * self.steps_per_epoch)), lr=ocfg.lr,
                                   output=self.output, check_grad_norm=scaler is None)
        ema = ModelEMA(self.model, ocfg.ema_decay) if ocfg.ema else None  # BN statistics averaged too
        scheduler = build_scheduler(optimizer, ocfg, self.epochs, self.steps_per_epoch)
        self.updater = Updater(self.model, optimizer, scheduler, scaler=scaler, clip=ocfg.clip_grad_norm, ema=ema,
                               want_grad_norm=self.guard.check_grad_norm)
        self.log = MetricsLog(self.output / "metrics.jsonl")  # written by rank 0 only
        self.writer = CheckpointWriter()
        tensorboard = TensorBoardLog(self.output / "tensorboard") if tcfg.tensorboard and self.main else None
        self.callbacks: list[Callback] = [
            Evaluation(tcfg.eval_every), GuardChecks(), *([compile_cache] if compile_cache is not None else []),
            EarlyStopping(tcfg.patience),  # off at None, but it still reads a resumed early-stopped run
            Checkpoints(self.writer, self.log, self.output, save_every=tcfg.save_every, main=self.main),
            *([Curves(self.output / "curves.png", main_metric)] if self.main else []), Logging(tensorboard)]
        self.start_epoch = 0
        self.best: float | None = None
        self.best_epoch: int | None = None  # the epoch (1-based) that scored self.best
        # early stopping (train.patience): the epoch it ended the run after, and its console line
        self.stopped_early: int | None = None
        self.stop_reason: str | None = None
        self.records: list[dict[str, Any]] = []  # metrics.jsonl's records (rank 0)
        # what an interrupted run can be resumed from: the epoch <output>/last.pt holds (set once
        # a checkpoint and its log line are on disk, or by resume() from that file), and the
        # epoch in progress (1-based)
        self.saved_epoch: int | None = None
        self.best_saved_epoch: int | None = None  # best.pt written by this run (newer than last.pt with save_every > 1)
        self.current_epoch: int | None = None
        self._train_s = 0.0  # training seconds of the whole run (train_time_total_s)

    # the updater's parts and the step's modules, under the names the Trainer always had
    optimizer = property(lambda self: self.updater.optimizer)
    scheduler = property(lambda self: self.updater.scheduler)
    scaler = property(lambda self: self.updater.scaler)
    ema = property(lambda self: self.updater.ema)
    train_model = property(lambda self: self.step.module, doc="what the step calls (DDP / compiled wrapper)")
    graphed = property(lambda self: self.step.graphed, doc="the GraphedForwardBackward of train.cuda_graph, or None")

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _seed_rank_rngs(self, epoch: int) -> None:
        """Ranks other than 0 draw dropout / drop-path / augmentation noise from global RNG
        streams of their own (rank 0 keeps the one-process stream)."""
        if self.world > 1 and not self.main:
            seed_everything(self.cfg.train.seed * 1_000_003 + epoch * 7919 + 104_729 * distributed.rank())

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last epoch's record (plus ``best_*``, and
        ``stopped_early``: the epoch ``train.patience`` ended the run after)."""
        self._emit("before_fit")  # the run folder; self.records from its log
        self._train_s = sum(r.get("train_time_s", 0.0) for r in self.records)
        record: dict[str, Any] = {}
        # a resumed run that train.patience had ended (and would end again): nothing to train
        epochs = range(self.start_epoch, self.epochs) if self.stopped_early is None else range(0)
        try:
            for epoch in epochs:
                self.current_epoch = epoch + 1
                if hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(epoch)
                result = self.train_one_epoch(epoch)
                self._emit("after_train_epoch", epoch, result)  # finite state (the guard), the compile cache
                record = self._record(epoch, result)
                self._emit("after_epoch", epoch, record)  # evaluate, guard, best.pt / last.pt + log line, curves
                if self.stopped_early is not None:  # EarlyStopping: this epoch was the run's last
                    self.console(self.stop_reason)
                    break
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
            with hold_signals():  # a second Ctrl-C waits: the files being written are finished
                self._emit("on_interrupt")  # then the log drops epochs no checkpoint holds
            raise
        finally:
            with hold_signals():
                self._emit("close")
        if not record:  # resumed a finished run: nothing trained, still report
            record = {"epoch": self.start_epoch, **{f"val_{k}": v for k, v in self.evaluate(final=True).items()}}
        if self.best is not None:
            record[f"best_{self.main_metric}"] = self.best
        if self.stopped_early is not None:
            record["stopped_early"] = self.stopped_early
        return record

    def train_one_epoch(self, epoch: int) -> EpochResult:
        """One pass over ``train_loader``; the host syncs at log points (``train.log_every``
        optimizer steps) only. ``train.accumulate`` K: one optimizer step per K batches."""
        self.step.module.train()
        log_every = max(1, self.cfg.train.log_every)
        k, batches = self.accumulate, len(self.train_loader)
        losses = EpochLosses(self.guard, self.device, self.world, epoch)
        bar = progress(self.train_loader, total=batches, desc=f"epoch {epoch + 1}/{self.epochs}", quiet=self.quiet)
        # without a terminal the bar is off: a line every train.log_seconds instead
        plain = PlainProgress(self.console, self.cfg.train.log_seconds, self.epochs, self.steps_per_epoch) \
            if bar.disable and not self.quiet else None
        start = time.perf_counter()
        self.step.begin_epoch(start)
        step = 0  # optimizer steps of this epoch
        group, group_images = None, 0  # K > 1: the group's mean [loss, *terms] so far (device), its images
        for i, (images, targets) in enumerate(bar):
            first, last = i % k == 0, (i + 1) % k == 0 or i + 1 == batches
            size = min(k, batches - (i - i % k))  # batches in this group: the epoch's last may be short
            with one_image_batches(self.model, self.world, epoch, i, images):
                # forward + backward (+ the graphed all-reduce); the gradient ends as the group's mean
                loss, loss_dict = self.step(images, targets, first=first, last=last, scale=1.0 / size)
            values = losses.values(loss, loss_dict)  # device work only
            if k > 1:
                group = values / size if group is None else group + values / size
                group_images += images.shape[0]
                if not last:
                    continue
                values, n, group, group_images = group, group_images, None, 0
            else:
                n = images.shape[0]
            grad_norm, lr = self.updater.step()  # clip, optimizer, schedule, EMA
            losses.add(step, values, n, grad_norm, lr)  # device work only
            step += 1
            if step % log_every == 0 or i + 1 == batches:
                losses.log_point()  # the sync (torchrun: one all-reduce); the guard raises here
                if not bar.disable:
                    bar.set_postfix(loss=f"{losses.mean_loss(step):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.3g}")
                elif plain is not None:
                    plain.update(epoch, step, start, losses.images * self.world, lambda: losses.mean_loss(step))
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        means, images = losses.end_epoch(step)
        return EpochResult(means, images, seconds, dict(self.step.extra))

    def _record(self, epoch: int, result: EpochResult) -> dict[str, Any]:
        """The epoch's training numbers, as ``metrics.jsonl`` holds them (``val_*`` come later)."""
        self._train_s += result.seconds
        loader_stats = getattr(self.train_loader, "epoch_stats", dict)()  # e.g. the padding fraction
        record = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                  **{f"train_{k}": v for k, v in result.losses.items()},
                  "train_images": result.images, "train_time_s": result.seconds,
                  "train_time_total_s": self._train_s,
                  "train_img_per_s": result.images / max(result.seconds, 1e-9),
                  **{f"train_{k}": v for k, v in result.extra.items()},
                  **{f"train_{k}": v for k, v in loader_stats.items()}}
        if self.world > 1:  # train_images and img/s count every rank's images
            record["world_size"] = self.world
        return record

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, Any]:
        model = self.eval_model
        model.eval()
        distributed.broadcast_buffers(model)  # every rank evaluates the weights rank 0 saves
        with autocast(self.device, self.amp):
            metrics = self.evaluate_fn(model, final and self.main)
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "task": self.task,
            "config": config_to_dict(self.cfg),
            "model": unwrap(self.model).state_dict(),
            **self.updater.state_dict(),  # ema, ema_steps, optimizer, scheduler, grad_scaler
            "epoch": epoch,
            "steps_per_epoch": self.steps_per_epoch,  # per rank: a resume with another world size re-seeks the schedule
            "world_size": self.world,
            "metrics": metrics,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,  # train.patience ended the run after this epoch
            "rng": rng_state(),  # rank 0's
            "meta": self.meta,  # what inference needs without the data: class names, normalisation
        }

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, EMA, epoch and RNG.

        Every rank reads the same file. A checkpoint written with N processes resumes with M
        (or with another ``train.accumulate``): weights and optimizer state do not depend on the
        world size; the schedule is moved to the optimizer step this run would have reached.
        Only rank 0's RNG state is stored, so a resumed run is bit-identical to an uninterrupted
        one in one process; with several processes the other ranks' global RNG streams are
        reseeded (data order and on-device augmentation are reseeded from (seed, epoch, rank)
        anyway). ``best_epoch`` and ``stopped_early`` come back too: ``EarlyStopping`` decides
        whether a run that ``train.patience`` ended trains on (``callbacks.py``).

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
        if self.ema is not None and ckpt.get("ema") is None:
            raise ValueError(f"{path} has no EMA weights but optim.ema is on")
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError:
            raise ValueError(self._model_mismatch(path, ckpt, saved_cfg, current)) from None
        saved_steps = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        saved_epochs = (saved_cfg.get("train") or {}).get("epochs", self.epochs)
        schedule_fits = saved_steps == self.steps_per_epoch and saved_epochs == self.epochs
        try:  # optimizer, loss scale (else, a bf16 run's file: a fresh scale), EMA, the schedule if it fits
            self.updater.load_state_dict(ckpt, schedule=schedule_fits)
        except OptimizerStateError as e:  # another parameter grouping (freeze_at, ...)
            differs = config_diff(saved_cfg, current, "model") + config_diff(saved_cfg, current, "optim")
            raise ValueError(f"--resume {path}: the checkpoint's optimizer state does not fit this command's "
                             f"model and optimizer: {'; '.join(differs) or e}; resume with the checkpoint's "
                             f"settings") from None
        self.start_epoch = start
        if not schedule_fits:
            # The saved schedule (its length, OneCycle's total) no longer fits: the schedule is a
            # function of the step, so a fresh one for this run's length is moved to the step reached.
            self.updater.rebuild_schedule(rebuild_scheduler(self.optimizer, self.model, self.cfg.optim, self.epochs,
                                                            self.steps_per_epoch), start * self.steps_per_epoch)
            where = (f"the schedule continues at step {start * self.steps_per_epoch} of "
                     f"{self.epochs * self.steps_per_epoch}")
            if saved_steps != self.steps_per_epoch:
                saved_k = (saved_cfg.get("train") or {}).get("accumulate", 1)
                self.console(f"{path}: {saved_steps} optimizer steps per epoch with {ckpt.get('world_size', 1)} "
                             f"process(es) and train.accumulate {saved_k}, now {self.steps_per_epoch} with "
                             f"{self.world} and {self.accumulate}: {where}")
            if saved_epochs != self.epochs:
                self.console(f"{path}: train.epochs {saved_epochs} in the checkpoint, {self.epochs} now: the "
                             f"learning-rate schedule is rebuilt for {self.epochs} epochs and {where}")
        self.best = ckpt.get("best")
        self.best_epoch = ckpt.get("best_epoch")  # None in older checkpoints: patience counts from here
        self.stopped_early = ckpt.get("stopped_early")  # EarlyStopping.before_fit decides what it means now
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

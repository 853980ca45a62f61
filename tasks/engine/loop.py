"""One train / evaluate loop for every task (torchvision ``references/engine.py`` in spirit).

The model's training forward returns a dict of named losses; the loop sums them, logs each
key, steps optimizer and schedule, keeps an optional EMA, evaluates, writes the run folder
(``metrics.jsonl``, ``curves.png``, ``last.pt`` / ``best.pt``) and resumes exactly.

Host syncs are kept out of the step: losses are accumulated on the device and checked for
non-finite values every ``log_every`` steps and at the end of the epoch, naming the first
bad step; nothing is saved after it.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .checkpoint import CKPT_FORMAT, CheckpointWriter, load_checkpoint, rng_state, set_rng_state
from .config import config_to_dict
from .ema import ModelEMA
from .graphs import GraphedForwardBackward
from .logging import Console, MetricsLog, format_metrics, progress
from .optim import build_optimizer, build_scheduler
from .viz import plot_curves

__all__ = ["NonFiniteLossError", "Trainer", "autocast", "unwrap"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving."""


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); plain fp32 elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` / DDP / EMA wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


@dataclass
class EpochResult:
    losses: dict[str, float]
    images: int
    seconds: float


class Trainer:
    """Fits ``model`` on ``train_loader``, evaluating every ``train.eval_every`` epochs and at the end.

    Args:
        task: task name stored in checkpoints.
        cfg: the task's config dataclass (``.optim``, ``.train`` used here; stored whole).
        model: a task model (train mode with targets returns a loss dict).
        train_loader: iterable of ``(images, targets)`` already on ``device``; ``len()`` steps;
            optional ``set_epoch(epoch)``.
        evaluate: ``evaluate(model, final)`` with the model to evaluate (the EMA model when
            enabled) in eval mode under ``torch.no_grad`` and autocast; returns metrics.
            ``final`` is true for the last epoch (write pictures, predictions).
        main_metric: key of ``evaluate``'s result that decides ``best.pt`` (higher is better).
        meta: stored in every checkpoint (class names, input normalisation, image size).
    """

    def __init__(self, task: str, cfg: Any, model: nn.Module, train_loader: Iterable, *,
                 evaluate: Callable[[nn.Module, bool], dict[str, Any]], main_metric: str, output: str | Path,
                 device: torch.device, console: Console | None = None, quiet: bool = False,
                 meta: dict[str, Any] | None = None) -> None:
        self.task, self.cfg = task, cfg
        self.device = device
        self.output = Path(output)
        self.console = console or Console(quiet)
        self.quiet = quiet
        self.train_loader = train_loader
        self.evaluate_fn = evaluate
        self.main_metric = main_metric
        self.meta = meta or {}
        tcfg, ocfg = cfg.train, cfg.optim
        self.epochs = tcfg.epochs
        self.amp = tcfg.amp and device.type == "cuda"

        self.model = model.to(device)
        if tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, ocfg, device)
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set gives no batch: is it empty, or smaller than the batch size?")
        self.scheduler = build_scheduler(self.optimizer, ocfg, self.epochs, self.steps_per_epoch)
        self.ema = None
        if ocfg.ema:
            self.ema = ModelEMA(self.model, ocfg.ema_decay)  # BN statistics averaged too
        if tcfg.cuda_graph and tcfg.compile:
            raise ValueError("train.cuda_graph and train.compile cannot be combined yet: choose one")
        self.step_model = torch.compile(self.model) if tcfg.compile else self.model
        self.graphed = None
        if tcfg.cuda_graph and device.type == "cuda":
            self.graphed = GraphedForwardBackward(self.model, self.optimizer, amp=self.amp)
        self.log = MetricsLog(self.output / "metrics.jsonl")
        self.writer = CheckpointWriter()
        self.start_epoch = 0
        self.best: float | None = None
        self._last_plot = 0.0

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
            "scaler": None,  # bf16 autocast needs no loss scaling
            "epoch": epoch,
            "metrics": metrics,
            "best": self.best,
            "rng": rng_state(),
            "meta": self.meta,  # what inference needs without the data: class names, normalisation
        }

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, EMA, epoch and RNG."""
        ckpt = load_checkpoint(path)
        if ckpt.get("task") != self.task:
            raise ValueError(f"{path} is a {ckpt.get('task')!r} checkpoint, not {self.task!r}")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError(f"{path} has no EMA weights but optim.ema is on")
            self.ema.load_state_dict(ckpt["ema"], ckpt.get("ema_steps", 0))
        self.start_epoch = int(ckpt["epoch"])
        self.best = ckpt.get("best")
        set_rng_state(ckpt["rng"])
        self.log.truncate_after(self.start_epoch)
        self.console(f"resumed from {path} after epoch {self.start_epoch}/{self.epochs}")

    # ------------------------------------------------------------------ loop
    def train_one_epoch(self, epoch: int) -> EpochResult:
        model, opt, sched = self.step_model, self.optimizer, self.scheduler
        model.train()
        clip = self.cfg.optim.clip_grad_norm
        log_every = max(1, self.cfg.train.log_every)
        sums: torch.Tensor | None = None
        keys: list[str] = []
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        n_images = 0
        bar = progress(self.train_loader, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}",
                       quiet=self.quiet)
        start = time.perf_counter()
        for step, (images, targets) in enumerate(bar):
            if self.graphed is not None:
                loss, loss_dict = self.graphed(images, targets)
            else:
                with autocast(self.device, self.amp):
                    loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if not keys:
                keys = list(loss_dict)
                sums = torch.zeros(len(keys) + 1, device=self.device)
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
            opt.step()
            sched.step()
            if self.ema is not None:
                self.ema.update(self.model)
            values = torch.stack([loss.detach().float()] + [loss_dict[k].detach().float() for k in keys])
            sums += values
            # remember the first non-finite step on the device; look at it only now and then
            bad = ~torch.isfinite(values).all() & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)
            n_images += images.shape[0]
            if (step + 1) % log_every == 0 or step + 1 == self.steps_per_epoch:
                self._check_finite(first_bad, epoch)
                if not bar.disable:
                    bar.set_postfix(loss=f"{float(sums[0]) / (step + 1):.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self._check_finite(first_bad, epoch)
        means = (sums / max(1, self.steps_per_epoch)).tolist() if sums is not None else [math.nan]
        losses = {"loss": means[0], **{f"loss_{k}": v for k, v in zip(keys, means[1:])}}
        return EpochResult(losses, n_images, seconds)

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        step = int(first_bad)
        if step >= 0:
            global_step = epoch * self.steps_per_epoch + step
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}); "
                f"stopped without saving it. Last good checkpoint: {self.output / 'last.pt'} "
                f"(if any). Lower optim.lr, set optim.clip_grad_norm, or check the data.")

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, Any]:
        model = self.eval_model
        model.eval()
        with autocast(self.device, self.amp):
            metrics = self.evaluate_fn(model, final)
        self.model.train()
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last epoch's record (plus ``best_*``)."""
        tcfg = self.cfg.train
        self.output.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {}
        total_train_s = sum(r.get("train_time_s", 0.0) for r in self.log.records())
        try:
            for epoch in range(self.start_epoch, self.epochs):
                if hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(epoch)
                result = self.train_one_epoch(epoch)
                total_train_s += result.seconds
                record = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                          **{f"train_{k}": v for k, v in result.losses.items()},
                          "train_images": result.images, "train_time_s": result.seconds,
                          "train_time_total_s": total_train_s,
                          "train_img_per_s": result.images / max(result.seconds, 1e-9)}
                last = epoch + 1 == self.epochs
                if last or (epoch + 1) % max(1, tcfg.eval_every) == 0:
                    t0 = time.perf_counter()
                    metrics = self.evaluate(final=last)
                    record.update({f"val_{k}": v for k, v in metrics.items()})
                    record["eval_time_s"] = time.perf_counter() - t0
                self.log.append(record)
                main = record.get(f"val_{self.main_metric}")
                is_best = main is not None and (self.best is None or main > self.best)
                if is_best:
                    self.best = main
                paths = []
                if last or (epoch + 1) % max(1, tcfg.save_every) == 0:
                    paths.append(self.output / "last.pt")
                if is_best:
                    paths.append(self.output / "best.pt")
                if paths:
                    self.writer.save(self.state_dict(epoch + 1, record), *paths)
                self._plot(force=last)
                self.console(f"epoch {epoch + 1}/{self.epochs}  " + format_metrics(
                    record, ["train_loss", f"val_{self.main_metric}", "train_img_per_s", "train_time_s"]))
        finally:
            self.writer.wait()
        if not record:  # resumed a finished run: nothing trained, still report
            record = {"epoch": self.start_epoch, **{f"val_{k}": v for k, v in self.evaluate(final=True).items()}}
        if self.best is not None:
            record[f"best_{self.main_metric}"] = self.best
        return record

    def _plot(self, force: bool) -> None:
        # Redrawing costs ~0.2 s of host time: at most every 15 s, and at the end.
        now = time.perf_counter()
        if force or now - self._last_plot > 15:
            plot_curves(self.log.records(), self.output / "curves.png", main_metric=self.main_metric)
            self._last_plot = now

"""What follows a step's backward: the gradients unscaled and clipped (or only their norm, for
the training guard), the optimizer step (through the GradScaler under float16), the per-step
schedule, the EMA; and that state in and out of checkpoints.

Per step only device work: the norm stays a device tensor (the guard reads it at log points),
the clipping is one foreach kernel set, the fused optimizers unscale and skip on the device.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .ema import ModelEMA

__all__ = ["Updater", "OptimizerStateError", "grad_norm", "seek_schedule"]


class OptimizerStateError(ValueError):
    """A saved optimizer state that does not fit this optimizer (another parameter grouping)."""


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The total 2-norm of the gradients, on the device (what ``clip_grad_norm_`` returns)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def seek_schedule(scheduler: LRScheduler, step: int) -> None:
    """Put a freshly built per-step schedule where ``step`` optimizer steps would have left it
    (setting the optimizer's lr / momentum). Resuming with another world size or batch size
    changes the steps per epoch, so the saved schedule state (step count, OneCycle's total)
    no longer fits; the schedule is a function of the step, so it is rebuilt and moved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended
        scheduler.last_epoch = step - 1
        scheduler.step()


class Updater:
    """``updater.step() -> (grad_norm, lr)`` once the gradients of an optimizer step are in:
    after each backward, or after the last of a ``train.accumulate`` group's (the step left
    their mean in ``.grad``: clipping, the loss scale's update and the EMA see one step).

    Args:
        model: the plain module (its trainable parameters are clipped; the EMA follows it).
        optimizer, scheduler: the schedule is stepped once per optimizer step.
        scaler: a ``GradScaler`` (float16), or None.
        clip: ``optim.clip_grad_norm`` (None / 0: no clipping).
        ema: a ``ModelEMA`` updated after every step, or None.
        want_grad_norm: without clipping, still compute the gradient norm (the guard's
            non-finite check; off under a GradScaler, whose skipped steps have inf gradients).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, *,
                 scaler: torch.amp.GradScaler | None = None, clip: float | None = None, ema: ModelEMA | None = None,
                 want_grad_norm: bool = False) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.clip, self.ema = scaler, clip, ema
        self.want_grad_norm = want_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self) -> tuple[torch.Tensor | None, float]:
        """Clip, step the optimizer, the schedule and the EMA. Returns the gradient norm (a
        device tensor, or None) and the learning rate this step used."""
        opt = self.optimizer
        norm = None
        if self.clip:
            if self.scaler is not None:
                self.scaler.unscale_(opt)  # clip the true gradients
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        elif self.want_grad_norm:
            norm = grad_norm(self.params)
        lr = opt.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return norm, lr

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries: ``ema``, ``ema_steps``, ``optimizer``, ``scheduler``, ``grad_scaler``."""
        return {"ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_steps": self.ema.updates if self.ema is not None else 0,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any], *, schedule: bool = True) -> None:
        """What ``state_dict`` wrote. The optimizer first: a state that does not fit raises
        ``OptimizerStateError`` before anything else is loaded. ``schedule=False``: the saved
        schedule does not fit this run (``rebuild_schedule`` follows). A checkpoint without a
        loss scale (a bf16 run's) leaves the fresh one; with the EMA on, ``state["ema"]`` must
        hold its weights (``Trainer.resume`` checks that first)."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # another parameter grouping (freeze_at, ...)
            raise OptimizerStateError((str(e).splitlines() or [type(e).__name__])[0]) from None
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if schedule:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"], state.get("ema_steps", 0))

    def rebuild_schedule(self, scheduler: LRScheduler, step: int) -> None:
        """Replace the schedule by ``scheduler`` (built for this run's length), moved to ``step``."""
        self.scheduler = scheduler
        seek_schedule(scheduler, step)

"""The training guard: notices a run that is not learning while it happens, and stops it.

A run stops with one line naming what went wrong, where, and what to try (``TrainingGuardError``;
the command-line tools exit with status 3), when:

* **non-finite**: the loss, one of its terms or the gradient norm is NaN or infinite;
* **diverged**: the mean loss over a log window (``train.log_every`` steps) exceeds
  ``DIVERGE_FACTOR`` x max(the loss of the run's first step, 1);
* **frozen**: a non-zero loss term has not moved by more than ``FROZEN_TOL`` of itself over a
  whole epoch of at least ``FROZEN_MIN_STEPS`` steps (shorter epochs are pooled) while the
  learning rate was not zero: the part of the model behind it receives no useful gradient (the
  detection head's dead box regression gave a GIoU loss of exactly 1.000 for a whole run);
* **non-finite state**: a weight, a BatchNorm statistic, an EMA weight or an optimizer state
  holds NaN or inf at the end of an epoch (checked before evaluating and before every save);
* **zero metric**: the validation metric is 0 at ``ZERO_EVALS`` evaluations in a row, each at
  least ``ZERO_MIN_STEPS`` optimizer steps past the end of the warm-up (a smoke test of a few
  steps proves nothing either way).

Nothing the guard stops is saved: the checkpoints of earlier epochs stay as they were, and no
checkpoint is ever written with a non-finite tensor (that check runs with the guard off too).
``train.guard=false`` turns off the diverged / frozen / zero-metric checks (the non-finite ones
always run).

Cost: per step only device work (a few element-wise kernels on a handful of scalars, no host
sync, so the CUDA-graph path keeps its pace); the values are read where the loop syncs anyway,
every ``train.log_every`` steps and once per epoch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import distributed

__all__ = ["TrainingGuardError", "NonFiniteLossError", "TrainingGuard", "first_nonfinite", "DIVERGE_FACTOR",
           "FROZEN_TOL", "FROZEN_MIN_STEPS", "ZERO_EVALS", "ZERO_MIN_STEPS"]

DIVERGE_FACTOR = 10.0
FROZEN_TOL = 1e-4
FROZEN_MIN_STEPS = 8
ZERO_EVALS = 2
ZERO_MIN_STEPS = 50


class TrainingGuardError(RuntimeError):
    """The training guard stopped a run that was not learning; nothing of it was saved."""


class NonFiniteLossError(TrainingGuardError):
    """The training loss (or a term of it, or the gradient norm) became NaN or infinite."""


def _tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def first_nonfinite(state: Any, *, all_ranks: bool = False) -> str | None:
    """The name of the first floating-point tensor in ``state`` (a nested dict / list, e.g. a
    checkpoint) holding NaN or inf, or None. One host sync: every tensor's flag is computed on its
    device and read at once. ``all_ranks``: the answer of every rank (under torchrun, so that all
    ranks stop together when one of them would save a bad tensor)."""
    groups: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in _tensors(state):
        if t.is_floating_point() or t.is_complex():
            groups.setdefault(t.device, []).append((name, ~torch.isfinite(t.detach()).all()))
    names = [name for items in groups.values() for name, _ in items]
    # one copy (one sync) per device holding tensors
    bad = torch.cat([torch.stack([flag for _, flag in items]).cpu() for items in groups.values()]) \
        if groups else torch.zeros(0, dtype=torch.bool)
    first = int(bad.int().argmax()) if bool(bad.any()) else -1
    if all_ranks and distributed.world_size() > 1:
        flag = torch.tensor([1.0 if first >= 0 else 0.0], device=distributed_device())
        if float(distributed.all_reduce(flag, "max")) > 0 and first < 0:
            return "(a tensor on another rank)"
    return names[first] if first >= 0 else None


def distributed_device() -> torch.device:
    """The device of the process group's collectives (CUDA for NCCL, else the CPU)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _num(v: float) -> str:
    return f"{v:.4g}"


class TrainingGuard:
    """The checks of the module docstring for one ``Trainer``.

    The loop calls ``step`` after every optimizer step with the step's ``[loss, *terms]`` (a
    device tensor) and gradient norm, ``log_point`` where it syncs for the progress bar (it
    returns a device flag, so that under torchrun the ranks can reduce it with their loss sums),
    ``end_epoch``, ``check_state`` before evaluating and saving, and ``check_metric`` after each
    evaluation. Each failing check raises ``TrainingGuardError`` (``NonFiniteLossError`` for
    non-finite losses)."""

    def __init__(self, *, enabled: bool, device: torch.device, steps_per_epoch: int, warmup_steps: int,
                 lr: float, output: str | Path, check_grad_norm: bool = True) -> None:
        self.enabled = enabled
        self.device = device
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.lr = lr  # the configured peak learning rate, for the advice
        self.output = Path(output)
        # with a GradScaler (float16) inf gradients are expected and their steps skipped
        self.check_grad_norm = check_grad_norm
        self.keys: list[str] = []
        self.ref: torch.Tensor | None = None  # the loss of the run's first step
        # where the first non-finite value was: epoch << 32 | step (ordered, reducible over ranks)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_index = torch.zeros((), dtype=torch.int64, device=device)  # which value
        self.window_sum = torch.zeros((), device=device)
        self.window_steps = 0
        self.window_first = (0, 0)  # (epoch, step) the log window started at
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.frozen_steps = 0  # steps in the frozen-check window
        self.frozen_first = (0, 0)
        self.frozen_lr = 0.0  # largest lr seen in that window
        self.zero_evals: list[int] = []  # epochs whose evaluation gave 0 after the warm-up

    # ------------------------------------------------------------------ per step (device only)
    def step(self, epoch: int, step: int, values: torch.Tensor, keys: Sequence[str], grad_norm: torch.Tensor | None,
             lr: float) -> None:
        """``values = [loss, *terms]`` (float32, on the device) of one optimizer step."""
        if not self.keys:
            self.keys = list(keys)
        if self.ref is None:
            self.ref = values[0].detach().clone()
        if self.lo is None:
            self.lo, self.hi = values[1:].clone(), values[1:].clone()
            self.frozen_first = (epoch, step)
        if self.window_steps == 0:
            self.window_first = (epoch, step)
        # terms first: a bad term makes the total bad too, and the term is what names the cause
        parts = [values[1:], values[:1]]
        if grad_norm is not None and self.check_grad_norm:
            parts.append(grad_norm.detach().float().reshape(1).to(values.device))
        bad = ~torch.isfinite(torch.cat(parts))
        first = bad.any() & (self.first_bad < 0)
        self.first_bad = torch.where(first, (epoch << 32) | step, self.first_bad)
        self.bad_index = torch.where(first, bad.int().argmax(), self.bad_index)
        self.window_sum += values[0]
        self.window_steps += 1
        torch.minimum(self.lo, values[1:], out=self.lo)
        torch.maximum(self.hi, values[1:], out=self.hi)
        self.frozen_steps += 1
        self.frozen_lr = max(self.frozen_lr, lr)

    # ------------------------------------------------------------------ checks (one sync each)
    def log_flag(self) -> torch.Tensor:
        """A device scalar > 0 when this rank's log window tripped a check (non-finite, or
        diverged); no sync. ``log_point`` reads it (or its reduction over ranks)."""
        flag = (self.first_bad >= 0).float()
        if self.enabled and self.ref is not None and self.window_steps:
            mean = self.window_sum / self.window_steps
            limit = DIVERGE_FACTOR * torch.clamp(self.ref.abs(), min=1.0)
            flag = flag + (mean > limit).float()
        return flag

    def log_point(self, epoch: int, flag: torch.Tensor | None = None, first_bad: torch.Tensor | None = None) -> None:
        """Raise if ``flag`` (default: this rank's ``log_flag()``) is set; then start a new log window.
        ``first_bad``: the first non-finite global step over all ranks (torchrun)."""
        flag = self.log_flag() if flag is None else flag
        if float(flag) > 0:
            self._raise_log(epoch, first_bad)
        self.window_sum.zero_()
        self.window_steps = 0

    def _raise_log(self, epoch: int, first_bad: torch.Tensor | None) -> None:
        step, index = int(self.first_bad), int(self.bad_index)
        if first_bad is not None and int(first_bad) >= 0:
            step = int(first_bad)
        if step >= 0:
            names = [f"loss term {k!r}" for k in self.keys] + ["training loss", "gradient norm"]
            what = names[index] if step == int(self.first_bad) and index < len(names) else "training loss"
            e, s = step >> 32, step & 0xFFFFFFFF
            raise NonFiniteLossError(
                f"non-finite {what} at epoch {e + 1}, step {s + 1} (global step {e * self.steps_per_epoch + s + 1}); "
                f"stopped without saving it. Last good checkpoint: {self.output / 'last.pt'} (if any). Try a lower optim.lr "
                f"(now {_num(self.lr)}), optim.clip_grad_norm, train.amp=false, or check the data.")
        mean = float(self.window_sum) / max(1, self.window_steps)
        ref = float(self.ref)
        e0, s0 = self.window_first
        raise TrainingGuardError(
            f"the training loss diverged: mean {_num(mean)} over steps {s0 + 1}-{s0 + self.window_steps} of epoch "
            f"{e0 + 1}, against {_num(ref)} at the first step (more than {DIVERGE_FACTOR:g}x); stopped without "
            f"saving it. Try a lower optim.lr (now {_num(self.lr)}), optim.clip_grad_norm or a longer "
            f"optim.warmup_epochs (train.guard=false trains on regardless).")

    def frozen_flag(self) -> torch.Tensor | None:
        """A device bool per loss term: unchanged over the window (None while the window is too
        short to judge, or the learning rate was 0 throughout it)."""
        if not self.enabled or self.lo is None or self.frozen_steps < FROZEN_MIN_STEPS or self.frozen_lr <= 0:
            return None
        # relative: a small term (a regulariser at 1e-4) still moves by a fraction of itself; a term
        # that is 0 throughout is switched off (a task weight of 0), not stuck
        size = torch.maximum(self.hi.abs(), self.lo.abs())
        return ((self.hi - self.lo) <= FROZEN_TOL * size) & (size > 0)

    def end_epoch(self, epoch: int, frozen: torch.Tensor | None = None) -> None:
        """The frozen-term check once per epoch (``frozen``: ``frozen_flag()`` reduced over ranks).
        The window closes when it has ``FROZEN_MIN_STEPS`` steps; shorter epochs pool."""
        frozen = self.frozen_flag() if frozen is None else frozen
        if frozen is None:
            return
        stuck = frozen.tolist()
        if any(stuck):
            i = stuck.index(True)
            value = float(self.hi[i])
            e0, s0 = self.frozen_first
            span = (f"epoch {epoch + 1}" if e0 == epoch and s0 == 0 and self.frozen_steps == self.steps_per_epoch
                    else f"epoch {e0 + 1} step {s0 + 1} to the end of epoch {epoch + 1}")
            raise TrainingGuardError(
                f"the loss term {self.keys[i]!r} stayed at {value:.4g} (within {FROZEN_TOL:g} of it) for all "
                f"{self.frozen_steps} steps of {span} while the learning rate was up to {_num(self.frozen_lr)}: "
                f"that part of the model is not learning (no gradient reaches it); stopped without saving this "
                f"epoch. Try a lower optim.lr (now {_num(self.lr)}), a longer optim.warmup_epochs, or check the "
                f"targets (train.guard=false trains on regardless).")
        self.lo = self.hi = None
        self.frozen_steps = 0
        self.frozen_lr = 0.0

    def check_state(self, state: Any, epoch: int, what: str = "the model") -> None:
        """Raise if any floating-point tensor of ``state`` (weights, BatchNorm statistics, EMA,
        optimizer state) is NaN / inf. Runs with the guard off too: nothing non-finite is saved."""
        bad = first_nonfinite(state, all_ranks=True)
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} holds NaN or inf values after epoch {epoch + 1} ({what}); stopped without saving it. "
                f"Last good checkpoint: {self.output / 'last.pt'} (if any). Try a lower optim.lr "
                f"(now {_num(self.lr)}), optim.clip_grad_norm, or train.amp=false.")

    def check_metric(self, epoch: int, name: str, value: Any, steps_done: int) -> None:
        """Stop when the validation metric is 0 at ``ZERO_EVALS`` evaluations in a row, each
        ``ZERO_MIN_STEPS`` past the warm-up (``steps_done``: optimizer steps so far)."""
        if not self.enabled or value is None or steps_done < self.warmup_steps + ZERO_MIN_STEPS:
            return
        try:
            value = float(value)
        except (TypeError, ValueError):
            return
        if math.isfinite(value) and value <= 0.0:
            self.zero_evals.append(epoch + 1)
        else:
            self.zero_evals = []
        if len(self.zero_evals) >= ZERO_EVALS:
            epochs = ", ".join(map(str, self.zero_evals))
            raise TrainingGuardError(
                f"validation {name} is 0 after epochs {epochs} (past the warm-up): the model is not learning; "
                f"stopped without saving epoch {epoch + 1}. Check that the labels / boxes match the images, or try "
                f"a lower optim.lr (now {_num(self.lr)}) or a longer optim.warmup_epochs (train.guard=false trains "
                f"on regardless).")

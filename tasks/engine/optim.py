"""Optimizer and per-step learning-rate schedule from ``OptimConfig``."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from .config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "rebuild_scheduler", "build_grad_scaler", "param_groups",
           "zero_momentum_buffers"]

# what a schedule writes into the optimizer's param groups (LambdaLR: initial_lr; OneCycleLR: the
# rest); a loaded optimizer state carries the saved schedule's values of them
SCHEDULE_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0, lr: float = 0.1,
                 trunk_lr_mult: float = 1.0) -> list[dict]:
    """conv / linear weights decay, norm weights and biases (1-D) do not by default; with
    ``trunk_lr_mult`` != 1 the backbone's parameters (``backbone.*``) get their own groups at
    ``lr * trunk_lr_mult`` (fine-tuning a pretrained trunk more gently than a new head)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trunk = trunk_lr_mult != 1.0 and name.split(".", 1)[0] == "backbone"
            groups.setdefault((trunk, p.ndim > 1), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else norm_weight_decay,
             "lr": lr * trunk_lr_mult if trunk else lr}
            for (trunk, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.norm_weight_decay, lr=cfg.lr, trunk_lr_mult=cfg.trunk_lr_mult)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: is every stage frozen (model.freeze_at=5) without a head?")
    # Fused kernels on CUDA: one launch for all parameters instead of several per tensor.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               **fast)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fast)  # betas (0.9, 0.999)
    raise ValueError(f"optim.name={cfg.name!r} is not supported; choose sgd or adamw")


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give SGD with momentum zero buffers before its first step, where it would make them itself.

    Needed under GradScaler (``train.amp_dtype=float16``): fused SGD creates its buffers with
    ``torch.empty_like`` in the first step and fills them there, and when the scaler skips that
    step (inf gradients, the usual start of a float16 run) the kernel returns before writing
    them; the next step then reads whatever the allocator held as momentum (NaN losses in a
    float16 GPU test, 2026-12-02). With dampening 0 a zero buffer gives the same first step
    (``momentum * 0 + g = g``). Buffers that exist (a resumed state) are kept."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group["dampening"] != 0:  # a zero buffer would scale the first step by 1 - dampening
            raise ValueError(f"SGD dampening={group['dampening']}: "
                             "zero momentum buffers need dampening 0")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_grad_scaler(optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype,
                      device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for float16 autocast on CUDA (``None`` otherwise: bf16 and fp32 need none).

    With the fused optimizers the scaler syncs nothing: they unscale, and skip a step with inf /
    NaN gradients, on the device. Its scale is allocated here, not inside a CUDA-graph capture,
    and SGD gets zero momentum buffers (``zero_momentum_buffers``: a skipped first step)."""
    if amp_dtype != torch.float16 or device.type != "cuda":
        return None
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(torch.ones((), device=device))  # allocates the scale and growth tracker
    zero_momentum_buffers(optimizer)
    return scaler


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> LRScheduler:
    """Stepped once per optimizer step."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.schedule == "onecycle" and total >= 8:  # shorter runs cannot hold its two phases
        pct = min(max(warmup, 2) / total, 0.5) if warmup > 0 else 0.3
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total, pct_start=pct,
                          cycle_momentum=cfg.name == "sgd" and cfg.momentum > 0)
    if cfg.schedule not in ("cosine", "constant", "onecycle"):
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not supported; choose cosine, onecycle or constant")
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return LambdaLR(optimizer, factor)


def rebuild_scheduler(optimizer: torch.optim.Optimizer, model: nn.Module, cfg: OptimConfig, epochs: int,
                      steps_per_epoch: int) -> LRScheduler:
    """A fresh schedule of ``epochs`` x ``steps_per_epoch`` steps for an optimizer whose state was
    loaded from a checkpoint of another length (``--resume`` with more epochs, another world
    size). The loaded param groups hold the old schedule's bookkeeping (OneCycle's ``max_lr``, a
    LambdaLR's ``initial_lr``, the lr of the step it stopped at), and a new schedule built over
    them would start from the wrong base (or fail: "KeyError: 'max_lr'"); they are reset to the
    config's base values first, as ``build_optimizer`` sets them. Seek it to the step reached
    (``loop.seek_schedule``)."""
    base = param_groups(model, cfg.weight_decay, cfg.norm_weight_decay, lr=cfg.lr, trunk_lr_mult=cfg.trunk_lr_mult)
    base = [g for g in base if g["params"]]
    if len(base) != len(optimizer.param_groups):
        raise ValueError(f"the optimizer has {len(optimizer.param_groups)} parameter groups, this model and config "
                         f"make {len(base)}: the checkpoint's optimizer state does not fit")
    for group, fresh in zip(optimizer.param_groups, base):
        for key in SCHEDULE_GROUP_KEYS:
            group.pop(key, None)
        group["lr"] = fresh["lr"]
        if cfg.name == "sgd" and "momentum" in group:  # OneCycle cycles it
            group["momentum"] = cfg.momentum
    return build_scheduler(optimizer, cfg, epochs, steps_per_epoch)

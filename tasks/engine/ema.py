"""Exponential moving average of a model's weights and buffers.

``torch.optim.swa_utils.AveragedModel`` reads its step counter from a device tensor on every
update (two host syncs per step, which stall a fast GPU loop); this keeps the counter on the
host and updates all floating-point tensors with one ``_foreach_lerp_``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * model`` after every step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` (as in TF / timm), so early
    averages are not dominated by the random initialisation. Integer buffers (BN step
    counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema_decay={decay} must be in [0, 1)")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list, list, list]:
        # Built once per source model: tensors are updated in place, so the lists stay valid.
        if getattr(self, "_source", None) is not model:
            ema_t = [t.detach() for t in self.module.state_dict().values()]
            model_t = [t.detach() for t in model.state_dict().values()]
            if len(ema_t) != len(model_t):
                raise ValueError("the EMA copy and the model have different state dicts")
            pairs = list(zip(ema_t, model_t))
            self._floats = ([e for e, _ in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
            self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]
            self._source = model
        return self._floats[0], self._floats[1], self._others

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_f, model_f, others = self._pairs(model)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - d)
        for e, m in others:
            e.copy_(m)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates

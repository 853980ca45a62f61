"""Fakes for the engine's unit tests: a tiny model returning a loss dict, a list-of-batches
loader with ``set_epoch``, a config of the engine's own sections, a fake evaluation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tasks.engine.config import OptimConfig, TrainConfig


class Tiny(nn.Module):
    """One linear layer; training returns two named loss terms, eval the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        out = self.fc(x)
        if self.training:
            return {"mse": F.mse_loss(out, y), "l2": out.pow(2).mean() * 1e-2}
        return out


class Batches(list):
    """``n`` fixed ``(x, y)`` batches; ``set_epoch`` records the epochs it is given."""

    def __init__(self, n: int = 4, batch: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        super().__init__((torch.randn(batch, 4, generator=g), torch.randn(batch, 2, generator=g)) for _ in range(n))
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


@dataclass
class ToyConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def toy_config(optim: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> ToyConfig:
    """SGD, constant lr, fp32 on the CPU, 3 epochs, a log point every 2 steps; plus overrides."""
    o = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "constant", "warmup_epochs": 0.0, **(optim or {})}
    t = {"epochs": 3, "amp": False, "channels_last": False, "log_every": 2, "device": "cpu", **(train or {})}
    return ToyConfig(dataclasses.replace(OptimConfig(), **o), dataclasses.replace(TrainConfig(), **t))


def metric_sequence(*values: float) -> Callable[[nn.Module, bool], dict[str, float]]:
    """A fake ``evaluate``: ``{"acc": value}`` with the next value at each call (the last repeats);
    its ``calls`` list holds the ``final`` flag of each call."""
    seq = list(values)
    calls: list[bool] = []

    def evaluate(model: nn.Module, final: bool) -> dict[str, float]:
        assert not model.training  # the Trainer evaluates in eval mode
        calls.append(final)
        return {"acc": seq[min(len(calls), len(seq)) - 1]}
    evaluate.calls = calls
    return evaluate


def make_trainer(output: Path, cfg: ToyConfig | None = None, batches: list | None = None,
                 evaluate: Callable | None = None, model: nn.Module | None = None,
                 console: Callable[[str], None] | None = None):
    """A CPU Trainer of ``Tiny`` (seeded: the same initial weights each time); ``console``: where
    its lines go (e.g. ``list.append``), else nowhere."""
    from tasks.engine.loop import Trainer

    torch.manual_seed(0)
    return Trainer("toy", cfg or toy_config(), model or Tiny(), Batches() if batches is None else batches,
                   evaluate=evaluate or metric_sequence(0.5), main_metric="acc", output=output,
                   device=torch.device("cpu"), quiet=True, console=console)


def merged(batches: list, k: int) -> list:
    """``batches`` with each run of ``k`` concatenated into one batch (the last run may be shorter)."""
    return [tuple(torch.cat(parts) for parts in zip(*batches[i:i + k])) for i in range(0, len(batches), k)]

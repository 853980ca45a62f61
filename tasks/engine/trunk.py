"""``--trunk CKPT``: start a task's backbone from another checkpoint's trunk, and say how.

Any onetrunk checkpoint works (a Fashion-MNIST classifier included: its grayscale ``conv1`` is
adapted to RGB), as do torchvision / timm ResNet state dicts. What cannot be carried over (a
``cifar`` 3x3 stem into an ``imagenet`` 7x7 one) is named and left at its initialisation;
a trunk of another depth is refused.
"""
from __future__ import annotations

import os
from typing import Callable

from backbones.resnet import ResNet
from backbones.weights import (CKPT_FORMAT, LoadReport, describe_layout, extract_backbone_state, layout_depth,
                               read_checkpoint, resnet_layout)

from .config import ModelConfig
from .registry import spec_for_checkpoint

__all__ = ["load_trunk"]


def load_trunk(backbone: ResNet, path: str | os.PathLike, model_cfg: ModelConfig,
               say: Callable[[str], None] = print) -> LoadReport:
    ckpt = read_checkpoint(path)
    notes = []
    if ckpt.get("format") == CKPT_FORMAT:
        spec_for_checkpoint(ckpt, f"--trunk {path}")  # any registered task's checkpoint holds a trunk
        # the trunk section every task's config shares (ModelConfig), as the checkpoint wrote it
        src = (ckpt.get("config") or {}).get("model", {})
        if src.get("depth") not in (None, model_cfg.depth):
            raise ValueError(f"--trunk {path} holds a ResNet-{src['depth']} trunk but this model is "
                             f"ResNet-{model_cfg.depth}: pass --set model.depth={src['depth']}")
        if src.get("stem") not in (None, model_cfg.stem):
            notes.append(f"the checkpoint's trunk has the {src['stem']!r} stem, this model the {model_cfg.stem!r} "
                         f"one: the stem conv starts from its initialisation (--set model.stem={src['stem']} "
                         f"carries it over)")
    else:  # a torchvision / timm state dict says nothing of its depth but its keys
        src = resnet_layout(extract_backbone_state(ckpt)[0])
        if src != backbone.layout:
            depth = layout_depth(src)
            raise ValueError(f"--trunk {path} holds a {describe_layout(src)} trunk but this model is "
                             f"{describe_layout(backbone.layout)}: "
                             + (f"pass --set model.depth={depth}" if depth else "it cannot be loaded into it"))
    report = backbone.load_weights(ckpt, strict=False, verbose=False, name=str(path))  # read once, above
    not_loaded = [k for k, *_ in report.mismatched] + report.missing
    frozen_names = {n for m in backbone.frozen_modules() for n, _ in m.named_parameters()}
    frozen_new = [k for k in not_loaded if any(k.endswith(n) for n in frozen_names)]
    if frozen_new:
        notes.append(f"{', '.join(frozen_new[:3])}{' ...' if len(frozen_new) > 3 else ''} not loaded but frozen "
                     f"(model.freeze_at={backbone.freeze_at}): it stays at its random initialisation; "
                     f"lower freeze_at or make the stems match")
    say(f"--trunk: {report}")
    for note in notes:
        say(f"  note: {note}")
    frozen = backbone.freeze_at
    say(f"  frozen: stem..C{frozen} (no gradients, fixed norm statistics)" if frozen else
        "  trainable (freeze with --set model.freeze_at=k: 1 = stem, 5 = the whole trunk)")
    say("  new, initialised here: the task head")
    return report

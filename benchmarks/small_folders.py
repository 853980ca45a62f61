"""A ResNet-18 trained from scratch on a small class-folder set in a plain loop: what the
regularisation does when there are too few images (a few hundred) for a trunk without weights.

    python -m benchmarks.small_folders DIR [--steps 1500] [--weight-decay 0.05] [--label-smoothing 0]
        [--dropout 0] [--no-rot90] [--seed 0] [--out FILE]

``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``python -m benchmarks.shapes --folders``
writes such a set). Every image is resized to 72x72 once and kept in memory; training draws
batches of 16 with replacement, augments with a random 64x64 crop, a horizontal flip and (unless
``--no-rot90``) a rotation by a multiple of 90 degrees, and steps AdamW (lr 1e-3, 100 warm-up
steps, cosine decay) on the cross-entropy; the trunk's pooled C5 goes through dropout into a
linear layer. Weight decay acts on every parameter, norm weights and biases included, and the
cosine runs over the whole run, warm-up included: both unlike the engine (``tasks.engine.optim``
spares norm weights and biases, and starts its cosine after the warm-up), so the numbers of this
loop are its own. Validation (the centre 64x64) every fifth of the run. CPU, two threads: 200 s
for 1,500 steps on two cores. Prints and writes (``--out``) the accuracies.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbones.resnet import resnet18
from benchmarks.schema import command_line, write_result
from tasks.data.folders import ImageFolderDataset
from tasks.data.images import read_image

CLAIM = "ResNet-18 from scratch on a small class-folder set: validation accuracy of a plain loop"
CROP, STORED = 64, 72


def load_split(folder: Path, classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image of ``folder/<class>/`` at 72x72, normalised, its labels and the class names."""
    ds = ImageFolderDataset(folder, classes=classes)  # the class-folder rules of a training run
    images = [cv2.resize(read_image(path), (STORED, STORED), interpolation=cv2.INTER_AREA) for path, _ in ds.samples]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.25, torch.tensor([label for _, label in ds.samples]), ds.classes


class Classifier(nn.Module):
    def __init__(self, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.trunk = resnet18(out_features=("c5",))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.trunk(x)["c5"].mean((2, 3))))


def augment(x: torch.Tensor, rot90: bool) -> torch.Tensor:
    n = len(x)
    top, left = torch.randint(0, STORED - CROP + 1, (2, n))
    out = torch.stack([x[k, :, top[k]:top[k] + CROP, left[k]:left[k] + CROP] for k in range(n)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(3)
    if rot90:
        turns = torch.randint(0, 4, (n,))
        out = torch.stack([torch.rot90(out[k], int(turns[k]), (1, 2)) for k in range(n)])
    return out


def run(root: Path, *, steps: int, weight_decay: float, label_smoothing: float, dropout: float, rot90: bool,
        seed: int, batch: int = 16, lr: float = 1e-3, warmup: int = 100) -> dict:
    x_train, y_train, classes = load_split(root / "train")
    x_val, y_val, _ = load_split(root / "val", classes)
    margin = (STORED - CROP) // 2
    x_val = x_val[:, :, margin:margin + CROP, margin:margin + CROP]
    torch.manual_seed(seed)
    model = Classifier(len(classes), dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    every = max(1, steps // 5)
    accuracies, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (batch,))
        loss = F.cross_entropy(model(augment(x_train[idx], rot90)), y_train[idx], label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                accuracies.append(round((model(x_val).argmax(1) == y_val).float().mean().item(), 4))
            model.train()
    return {"classes": classes, "train_images": len(y_train), "val_images": len(y_val), "accuracy": accuracies[-1],
            "accuracies": accuracies, "last_train_loss": round(loss.item(), 4),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_folders", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="a folder with train/<class>/ and val/<class>/")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--no-rot90", dest="rot90", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="the initial weights and the batches")
    p.add_argument("--out", type=Path, help="the result file (JSON)")
    args = p.parse_args(argv)
    for split in ("train", "val"):
        if not (args.root / split).is_dir():
            p.error(f"{args.root / split}: not a folder (expected {args.root}/train/<class>/ and val/<class>/)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = {k: getattr(args, k) for k in ("steps", "weight_decay", "label_smoothing", "dropout", "rot90", "seed")}
    result = run(args.root, **settings)
    print(f"accuracy {result['accuracy']:.4f} (every fifth of the run: {result['accuracies']}), "
          f"{result['wall_s']} s", flush=True)
    if args.out:
        write_result(args.out, claim=CLAIM, numbers={"accuracy": result["accuracy"]},
                     command=command_line("benchmarks.small_folders", argv), extra={"settings": settings, **result})
    return result


if __name__ == "__main__":
    main()

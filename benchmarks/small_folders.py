"""A ResNet-18 trained from scratch on a small class-folder set in a plain loop: what the
regularisation does when there are too few images (a few hundred) for a trunk without weights.

    python -m benchmarks.small_folders DIR [--steps 1500] [--weight-decay 0.05] [--label-smoothing 0]
        [--dropout 0] [--no-rot90 | --any-angle] [--mixup 0] [--loss ce|cosine] [--sgd --lr 0.05]
        [--seed 0] [--out FILE]

``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``python -m benchmarks.shapes --folders``
writes such a set). Every image is resized to 72x72 once and kept in memory; training draws
batches of 16 with replacement, augments with a random 64x64 crop, a horizontal flip and (unless
``--no-rot90``) a rotation by a multiple of 90 degrees (``--any-angle``: by any angle, the corners
filled grey), optionally mixup (``--mixup ALPHA``, the Beta(alpha, alpha) mix of the batch with a
shuffle of itself), and steps AdamW (lr 1e-3, 100 warm-up steps, cosine decay; ``--sgd``: SGD with
Nesterov momentum 0.9, coupled decay) on the cross-entropy (``--loss cosine``: one minus the cosine
to the one-hot target plus 0.1 x the cross-entropy of 10 x the normalised logits, Barz & Denzler's
loss for small data); the trunk's pooled C5 goes through dropout into a linear layer. Weight
decay acts on every parameter, norm weights and biases included, and the
cosine runs over the whole run, warm-up included: both unlike the engine (``tasks.engine.optim``
spares norm weights and biases, and starts its cosine after the warm-up), so the numbers of this
loop are its own. Validation (the centre 64x64) every fifth of the run. CPU, two threads: 200-300 s
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
import torchvision.transforms.v2.functional as TF
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


def augment(x: torch.Tensor, rot90: bool, any_angle: bool = False) -> torch.Tensor:
    n = len(x)
    top, left = torch.randint(0, STORED - CROP + 1, (2, n))
    out = torch.stack([x[k, :, top[k]:top[k] + CROP, left[k]:left[k] + CROP] for k in range(n)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(3)
    if any_angle:
        out = torch.stack([TF.rotate(out[k], float(angle)) for k, angle in enumerate(torch.rand(n) * 360)])
    elif rot90:
        turns = torch.randint(0, 4, (n,))
        out = torch.stack([torch.rot90(out[k], int(turns[k]), (1, 2)) for k in range(n)])
    return out


def loss_fn(logits: torch.Tensor, y: torch.Tensor, kind: str, label_smoothing: float) -> torch.Tensor:
    if kind == "cosine":
        z = F.normalize(logits, dim=1)
        return (1 - z.gather(1, y[:, None])).mean() + 0.1 * F.cross_entropy(10 * z, y, label_smoothing=label_smoothing)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def run(root: Path, *, steps: int, weight_decay: float, label_smoothing: float, dropout: float, rot90: bool,
        seed: int, any_angle: bool = False, mixup: float = 0.0, loss: str = "ce", sgd: bool = False,
        lr: float | None = None, batch: int = 16, warmup: int = 100) -> dict:
    x_train, y_train, classes = load_split(root / "train")
    x_val, y_val, _ = load_split(root / "val", classes)
    margin = (STORED - CROP) // 2
    x_val = x_val[:, :, margin:margin + CROP, margin:margin + CROP]
    torch.manual_seed(seed)
    model = Classifier(len(classes), dropout)
    lr = lr if lr is not None else 0.05 if sgd else 1e-3
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    every = max(1, steps // 5)
    accuracies, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (batch,))
        x, y = augment(x_train[idx], rot90, any_angle), y_train[idx]
        if mixup > 0:
            lam, perm = float(torch.distributions.Beta(mixup, mixup).sample()), torch.randperm(batch)
            logits = model(lam * x + (1 - lam) * x[perm])
            value = lam * loss_fn(logits, y, loss, label_smoothing) + (1 - lam) * loss_fn(logits, y[perm], loss,
                                                                                           label_smoothing)
        else:
            value = loss_fn(model(x), y, loss, label_smoothing)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                accuracies.append(round((model(x_val).argmax(1) == y_val).float().mean().item(), 4))
            model.train()
    return {"classes": classes, "train_images": len(y_train), "val_images": len(y_val), "accuracy": accuracies[-1],
            "accuracies": accuracies, "last_train_loss": round(value.item(), 4),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_folders", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="a folder with train/<class>/ and val/<class>/")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    turns = p.add_mutually_exclusive_group()
    turns.add_argument("--no-rot90", dest="rot90", action="store_false", help="no quarter turns")
    turns.add_argument("--any-angle", action="store_true", help="rotations by any angle instead of quarter turns")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup's alpha (0: off)")
    p.add_argument("--loss", choices=("ce", "cosine"), default="ce")
    p.add_argument("--sgd", action="store_true", help="SGD (Nesterov momentum 0.9) instead of AdamW")
    p.add_argument("--lr", type=float, help="peak learning rate (1e-3 for AdamW, 0.05 for SGD)")
    p.add_argument("--seed", type=int, default=0, help="the initial weights and the batches")
    p.add_argument("--out", type=Path, help="the result file (JSON)")
    args = p.parse_args(argv)
    for split in ("train", "val"):
        if not (args.root / split).is_dir():
            p.error(f"{args.root / split}: not a folder (expected {args.root}/train/<class>/ and val/<class>/)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = {k: getattr(args, k) for k in ("steps", "weight_decay", "label_smoothing", "dropout", "rot90", "seed",
                                              "any_angle", "mixup", "loss", "sgd", "lr")}
    result = run(args.root, **settings)
    print(f"accuracy {result['accuracy']:.4f} (every fifth of the run: {result['accuracies']}), "
          f"{result['wall_s']} s", flush=True)
    if args.out:
        write_result(args.out, claim=CLAIM, numbers={"accuracy": result["accuracy"]},
                     command=command_line("benchmarks.small_folders", argv), extra={"settings": settings, **result})
    return result


if __name__ == "__main__":
    main()

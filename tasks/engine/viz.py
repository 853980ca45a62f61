"""Pictures for run folders: training curves and confusion matrices (matplotlib, Agg); and
``write_file`` / ``write_json``, through which every picture and ``--predict`` file is written."""
from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # run folders are written on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoint import write_atomic  # noqa: E402

__all__ = ["plot_curves", "plot_confusion", "save_figure", "class_colors", "draw_detection_grid",
           "draw_segmentation_grid", "overlay_mask", "save_palette_mask", "write_file", "write_json"]

# While ``--predict`` writes one input's files, ``predict_files`` routes ``write_file`` here
# (tasks/engine/predict.py): the files are staged and appear together, under names no other
# input and no input file has. ``None``: an ordinary atomic write.
WRITE_HOOK: ContextVar[Callable[[Path, Callable[[Path], Any]], Any] | None] = ContextVar("onetrunk_write_hook",
                                                                                          default=None)


def write_file(path: str | os.PathLike, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` into a new temp file beside ``path``, then ``os.replace`` over ``path``
    (a crash leaves the previous file or the new one; a failed write is one ``OSError``
    naming ``path``); returns what ``write`` returned. Inside ``predict_files`` the file is
    staged with the other files of its input instead (``WRITE_HOOK``)."""
    hook = WRITE_HOOK.get()
    if hook is not None:
        return hook(Path(path), write)
    return write_atomic(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, through ``write_file``."""
    text = json.dumps(obj, indent=1)  # before the file exists: an unserialisable value leaves nothing
    write_file(path, lambda tmp: tmp.write_text(text))


def save_figure(fig, path: str | os.PathLike) -> None:
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike, *, main_metric: str | None = None) -> None:
    """Loss terms (left) and validation metrics (right) per epoch."""
    if not records:
        return
    keys = list(dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float))))
    loss_keys = [k for k in keys if k.startswith("train_loss")]
    if len(loss_keys) == 2:  # one loss term: its curve is the total's
        loss_keys = ["train_loss"]
    metric_keys = [k for k in keys if k.startswith("val_")]

    def series(key):  # only the epochs that have the key (evaluation may skip epochs)
        pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in loss_keys:
        axes[0].plot(*series(k), marker=".", label=k[len("train_"):])
    axes[0].set(xlabel="epoch", ylabel="training loss", title="loss")
    axes[0].grid(alpha=0.3)
    if loss_keys:
        axes[0].legend(fontsize=8)
    for k in metric_keys:
        lw = 2.5 if main_metric and k == f"val_{main_metric}" else 1.2
        axes[1].plot(*series(k), marker=".", lw=lw, label=k[len("val_"):])
    axes[1].set(xlabel="epoch", title="validation")
    axes[1].grid(alpha=0.3)
    if metric_keys:
        axes[1].legend(fontsize=8)
    save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, *, title: str = "") -> None:
    """Row-normalised confusion matrix with counts, true class on the rows."""
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.clip(m.sum(1, keepdims=True), 1, None)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    save_figure(fig, path)


# Class colours shared by the detection and segmentation pictures (matplotlib's tab20).
def class_colors(n: int) -> list[tuple[int, int, int]]:
    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(n)]


def draw_detection_grid(images: Sequence, predictions: Sequence[dict], class_names: Sequence[str],
                        path: str | os.PathLike, *, targets: Sequence[dict] | None = None,
                        score_thresh: float = 0.4, max_boxes: int = 15, nrow: int = 4, min_side: int = 384) -> None:
    """Predicted boxes (class colour, label and score; the ``max_boxes`` best above
    ``score_thresh``) over uint8 ``[3, H, W]`` images, ground truth (if given) as thin white
    boxes; small images are upscaled to ``min_side`` so labels stay legible. One grid PNG."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, make_grid

    colors = class_colors(len(class_names))
    tiles = []
    for i, (img, pred) in enumerate(zip(images, predictions)):
        img = img.cpu()
        zoom = max(1.0, min_side / max(img.shape[-2:]))
        if zoom > 1:
            size = (round(img.shape[-2] * zoom), round(img.shape[-1] * zoom))
            img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            img = img.round().clamp(0, 255).to(torch.uint8)
        if targets is not None and len(targets[i]["boxes"]):
            img = draw_bounding_boxes(img, targets[i]["boxes"].cpu().float() * zoom, colors="white", width=1)
        scores = pred["scores"].cpu().float()
        keep = (scores >= score_thresh).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True)][:max_boxes]
        boxes, scores, labels = pred["boxes"].cpu()[keep].float() * zoom, scores[keep], pred["labels"].cpu()[keep]
        if len(boxes):
            text = [f"{class_names[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
            img = draw_bounding_boxes(img, boxes, labels=text, colors=[colors[int(c)] for c in labels], width=2)
        tiles.append(img)
    grid = make_grid(_same_size(tiles), nrow=nrow, padding=4, pad_value=255)
    write_file(path, Image.fromarray(grid.permute(1, 2, 0).numpy()).save)


def _same_size(tiles):
    """One batch of uint8 ``[3, H, W]`` tiles, each padded white bottom / right to the largest
    (images of other aspect ratios, from the aspect mode or ``--predict``, share one grid)."""
    import torch

    from tasks.data.images import pad_batch
    return pad_batch([t.cpu() for t in tiles], size_divisible=1, fill=255) if tiles else torch.zeros(0, 3, 1, 1)


def overlay_mask(image, labels, colors, ignore_index: int = 255):
    """uint8 ``[3, H, W]`` image with label map ``[H, W]`` painted over it (class 0 and
    ``ignore_index`` left bare)."""
    import torch
    from torchvision.utils import draw_segmentation_masks

    k = len(colors)
    classes = torch.arange(1, k, device=labels.device)[:, None, None]  # background not painted
    masks = (labels[None] == classes) & (labels[None] != ignore_index)  # [K-1, H, W]
    if not masks.any():
        return image
    return draw_segmentation_masks(image, masks, alpha=0.55, colors=colors[1:])


def draw_segmentation_grid(images: Sequence, predictions: Sequence, class_names: Sequence[str],
                           path: str | os.PathLike, *, targets: Sequence | None = None,
                           ignore_index: int = 255) -> None:
    """One row per image: the image, the true mask over it (if given), the predicted mask over
    it. ``images`` uint8 ``[3, H, W]``; masks integer ``[H, W]``. Saved as one PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    colors = class_colors(len(class_names))
    tiles = []
    for i, (img, pred) in enumerate(zip(images, predictions)):
        img = img.cpu()
        tiles.append(img)
        if targets is not None:
            tiles.append(overlay_mask(img, targets[i].cpu(), colors, ignore_index))
        tiles.append(overlay_mask(img, pred.cpu(), colors, ignore_index))
    grid = make_grid(_same_size(tiles), nrow=3 if targets is not None else 2, padding=4, pad_value=255)
    write_file(path, Image.fromarray(grid.permute(1, 2, 0).numpy()).save)


def save_palette_mask(mask, path: str | os.PathLike, n_classes: int) -> None:
    """A label map as a 'P' PNG (VOC style: pixel value = class, palette = class colours)."""
    import numpy as np
    from PIL import Image

    pal = [0, 0, 0] + [c for rgb in class_colors(max(n_classes, 1))[1:] for c in rgb]
    pal += [0] * (3 * 255 - len(pal)) + [255, 255, 255]  # index 255 (ignore) in white
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(pal)
    write_file(path, img.save)

"""Pictures for run folders: training curves, confusion matrices and precision-recall curves
(matplotlib, Agg), image grids with boxes and masks and a legend of the classes shown; and
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

__all__ = ["plot_curves", "plot_confusion", "plot_pr_curves", "save_figure", "class_colors", "object_colors",
           "draw_detection_grid", "detection_tile", "save_grid", "draw_segmentation_grid", "overlay_mask",
           "save_palette_mask", "write_file", "write_json"]

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


def save_figure(fig, path: str | os.PathLike, tight: bool = True) -> None:
    """``fig`` as a PNG; ``tight`` crops to the drawn content, at the cost of a second layout
    pass (a figure with fixed margins passes ``False``)."""
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight" if tight else None))
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
    def series(key):  # only the epochs that have the key (evaluation may skip epochs), without
        # COCO's -1 (no object of that size in the val set: APl on small images)
        pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] != -1]
        return [p[0] for p in pts], [p[1] for p in pts]

    metric_keys = [k for k in keys if k.startswith("val_") and series(k)[0]]

    # fixed margins, not bbox_inches="tight": its second layout pass took 0.32 s a picture
    # against 0.20 s (2 CPU cores), and curves.png is redrawn during training
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.13, top=0.92, wspace=0.15)
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
    save_figure(fig, path, tight=False)


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


def plot_pr_curves(recall: np.ndarray, precision: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                   *, ap: Sequence[float] | None = None, title: str = "precision-recall at IoU 0.5",
                   colors: Sequence[tuple[int, int, int]] | None = None) -> None:
    """One precision-recall curve per class (``precision`` ``[K, R]`` over ``recall`` ``[R]``;
    a NaN row, a class without ground truth, is left out) and their mean (thick, black). The
    legend names each class with ``ap`` (its area); past 20 classes they are drawn thin and grey
    without names."""
    precision = np.asarray(precision, dtype=np.float64).reshape(len(class_names), -1)
    colors = colors or object_colors(len(class_names))
    valid = ~np.isnan(precision).any(1)
    many = valid.sum() > 20
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, name in enumerate(class_names):
        if not valid[i]:
            continue
        if many:
            ax.plot(recall, precision[i], color="0.75", lw=0.6)
        else:
            label = name if ap is None else f"{name}  {ap[i]:.3f}"
            ax.plot(recall, precision[i], color=np.array(colors[i]) / 255, lw=1.3, label=label)
    if valid.any():
        mean = precision[valid].mean(0)
        label = "mean" if ap is None else f"mean  {np.mean([ap[i] for i in np.flatnonzero(valid)]):.3f}"
        ax.plot(recall, mean, color="black", lw=2.5, label=label)
    else:
        ax.text(0.5, 0.5, "no class has ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title + (f" ({int(valid.sum())} classes in grey)" if many else ""))
    ax.grid(alpha=0.3)
    if valid.any():
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="class  AP" if ap else None,
                  title_fontsize=7)
    save_figure(fig, path)


# Class colours shared by the detection and segmentation pictures (matplotlib's tab20).
def class_colors(n: int) -> list[tuple[int, int, int]]:
    """The colours of ``n`` segmentation classes, background (index 0) first."""
    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(n)]


def object_colors(n: int) -> list[tuple[int, int, int]]:
    """The colours of ``n`` object classes (detection labels, no background): label ``c`` takes
    segmentation index ``c + 1``'s colour, so a class looks the same in every picture."""
    return class_colors(n + 1)[1:]


def draw_detection_grid(images: Sequence, predictions: Sequence[dict], class_names: Sequence[str],
                        path: str | os.PathLike, *, targets: Sequence[dict] | None = None,
                        score_thresh: float = 0.4, max_boxes: int = 15, nrow: int = 4, min_side: int = 384,
                        colors: Sequence[tuple[int, int, int]] | None = None) -> None:
    """Predicted boxes (class colour, label and score; the ``max_boxes`` best above
    ``score_thresh``) over uint8 ``[3, H, W]`` images, ground truth (if given) as thin white
    boxes; small images are upscaled to ``min_side`` so labels stay legible. One grid PNG with
    a legend of the classes drawn."""
    colors = colors or object_colors(len(class_names))
    tiles, shown = [], set()
    for i, (img, pred) in enumerate(zip(images, predictions)):
        tile, classes = detection_tile(img, pred, class_names, colors, score_thresh=score_thresh, max_boxes=max_boxes,
                                       min_side=min_side, target_boxes=None if targets is None else targets[i]["boxes"])
        tiles.append(tile)
        shown |= classes
    note = [f"boxes: score >= {score_thresh:.2f}" + ("" if shown else " (none)")]
    if targets is not None:
        note.append("white: ground truth")
    save_grid(tiles, path, nrow=nrow, legend=[(class_names[c], colors[c]) for c in sorted(shown)], note="; ".join(note))


def detection_tile(img, pred: dict | None, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]], *,
                   score_thresh: float = 0.4, max_boxes: int = 15, min_side: int = 384, target_boxes=None):
    """One uint8 ``[3, H, W]`` image upscaled to ``min_side``, ``target_boxes`` in thin white,
    the ``max_boxes`` best predicted boxes above ``score_thresh`` in their class colours, each
    labelled "class score" on a filled tag. Returns the tile and the set of labels drawn."""
    import torch
    import torch.nn.functional as F
    from torchvision.utils import draw_bounding_boxes

    img = img.cpu()
    zoom = max(1.0, min_side / max(img.shape[-2:]))
    if zoom > 1:
        size = (round(img.shape[-2] * zoom), round(img.shape[-1] * zoom))
        img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        img = img.round().clamp(0, 255).to(torch.uint8)
    if target_boxes is not None and len(target_boxes):
        img = draw_bounding_boxes(img, target_boxes.cpu().float() * zoom, colors="white", width=1)
    if pred is None or not len(pred["scores"]):
        return img, set()
    scores = pred["scores"].cpu().float()
    keep = (scores >= score_thresh).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)][:max_boxes]
    boxes, scores, labels = pred["boxes"].cpu()[keep].float() * zoom, scores[keep], pred["labels"].cpu()[keep].tolist()
    if not len(boxes):
        return img, set()
    img = draw_bounding_boxes(img, boxes, colors=[colors[c] for c in labels], width=2)
    text = [f"{class_names[c]} {float(s):.2f}" for c, s in zip(labels, scores)]
    return _tag_boxes(img, boxes, text, [colors[c] for c in labels]), set(labels)


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _ink(rgb) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``rgb``."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _tag_boxes(img, boxes, texts: Sequence[str], colors):
    """Each text on a tag filled with its box's colour, inside the box's top-left corner
    (kept inside the image): readable on any background."""
    import torch
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(pil), _font()
    for (x1, y1, _, _), text, color in zip(boxes.tolist(), texts, colors):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(0, int(x1) + 1), max(0, pil.width - w))
        y = min(max(0, int(y1) + 1), max(0, pil.height - h))
        draw.rectangle((x, y, x + w, y + h), fill=tuple(color))
        draw.text((x + 2 - left, y + 2 - top), text, fill=_ink(color), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def save_grid(tiles: Sequence, path: str | os.PathLike, *, nrow: int,
              legend: Sequence[tuple[str, tuple[int, int, int]]] = (), note: str = "") -> None:
    """uint8 ``[3, H, W]`` tiles as one PNG grid (``nrow`` per row), with a band below naming
    each legend class beside a swatch of its colour, then ``note``."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    grid = make_grid(_same_size(tiles), nrow=nrow, padding=4, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if legend or note:
        font = _font()
        line = 18
        probe = ImageDraw.Draw(picture)
        items = [(name, probe.textlength(name, font=font) + 28, color) for name, color in legend]
        # as wide as the grid, or as the widest entry / the note where the grid is narrower
        width = int(max([picture.width, probe.textlength(note, font=font) + 12] + [w + 12 for _, w, _ in items]))
        rows, x = 1, 6
        for _, w, _ in items:  # flow the entries into rows
            if x + w > width and x > 6:
                rows, x = rows + 1, 6
            x += w
        joined = Image.new("RGB", (width, picture.height + line * (rows + (1 if note else 0)) + 8), "white")
        joined.paste(picture, (0, 0))
        draw = ImageDraw.Draw(joined)
        x, y = 6, picture.height + 4
        for name, w, color in items:
            if x + w > width and x > 6:
                x, y = 6, y + line
            draw.rectangle((x, y + 2, x + 12, y + 14), fill=tuple(color), outline=(80, 80, 80))
            draw.text((x + 17, y + 1), name, fill=(0, 0, 0), font=font)
            x += w
        if note:
            draw.text((6, y + (line if items else 0) + 1), note, fill=(60, 60, 60), font=font)
        picture = joined
    # zlib level 1, not PIL's 6: a 4000 x 3000 photo's overlay (8000 x 3000 px) is written in
    # 2.2 s instead of 6.9 s on a 2-core CPU, for a file 13% larger (42 against 37 MB)
    write_file(path, lambda tmp: picture.save(tmp, compress_level=1))


def _same_size(tiles):
    """One batch of uint8 ``[3, H, W]`` tiles, each padded white bottom / right to the largest
    (images of other aspect ratios, from the aspect mode or ``--predict``, share one grid)."""
    import torch

    from tasks.data.images import pad_batch
    return pad_batch([t.cpu() for t in tiles], size_divisible=1, fill=255) if tiles else torch.zeros(0, 3, 1, 1)


def overlay_mask(image, labels, colors, ignore_index: int = 255, *, gray: bool = False):
    """uint8 ``[3, H, W]`` image with label map ``[H, W]`` painted over it (class 0 and
    ``ignore_index`` left bare); ``gray``: over the image in grey levels, where the class
    colours cannot be confused with the image's own (FashionScenes' items are tinted)."""
    import torch
    from torchvision.utils import draw_segmentation_masks

    if gray:
        luma = (0.299 * image[0].float() + 0.587 * image[1].float() + 0.114 * image[2].float())  # [H, W]
        image = luma.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
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
    it (in grey levels). ``images`` uint8 ``[3, H, W]``; masks integer ``[H, W]``. Saved as one
    PNG with a legend of the classes painted (class 0, background, is left bare)."""
    import torch

    colors = class_colors(len(class_names))
    tiles, present = [], set()
    for i, (img, pred) in enumerate(zip(images, predictions)):
        img = img.cpu()
        tiles.append(img)
        masks = ([targets[i].cpu()] if targets is not None else []) + [pred.cpu()]
        for mask in masks:
            tiles.append(overlay_mask(img, mask, colors, ignore_index, gray=True))
            present |= set(torch.unique(mask).tolist())
    legend = [(class_names[c], colors[c]) for c in sorted(present) if 0 < c < len(class_names)]
    note = "columns: image, truth, prediction" if targets is not None else "columns: image, prediction"
    save_grid(tiles, path, nrow=3 if targets is not None else 2, legend=legend, note=note)


def save_palette_mask(mask, path: str | os.PathLike, n_classes: int) -> None:
    """A label map as a 'P' PNG (VOC style: pixel value = class, palette = class colours)."""
    import numpy as np
    from PIL import Image

    pal = [0, 0, 0] + [c for rgb in class_colors(max(n_classes, 1))[1:] for c in rgb]
    pal += [0] * (3 * 255 - len(pal)) + [255, 255, 255]  # index 255 (ignore) in white
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(pal)
    write_file(path, img.save)

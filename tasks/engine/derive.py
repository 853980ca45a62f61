"""Settings made for the user's own data.

A run on the built-in data (Fashion-MNIST, FashionScenes) takes the task's recipe. A run on the
user's own data (``--train-images``, ``--train-ann``, ``--voc-root``, ...) takes no built-in
recipe unless ``--config`` names one: the task describes the data (``TaskSpec.describe_data``
-> ``DataFacts``: counts, classes, channels, median size, read from headers and annotation
files without decoding images) and ``derive`` turns that into settings, each with the reason it
was chosen, printed at the start and recorded in config.yaml. Whatever the user sets
(``--set``, ``--epochs``, ``--batch-size``, ...) is kept as given and marked "yours".

With ``--config`` naming a recipe only the facts of the data are derived (channels, classes,
the dataset kind): the recipe's training settings apply as written.

The rules (what ultralytics and timm's train script fix or derive, made explicit):

* channels: 1 when every sampled training image is grayscale, else 3 (classification; the
  dense tasks read RGB);
* classes: the data's (class folders, COCO categories, ``classes.txt`` / ``--classes``, VOC
  object names, mask values);
* weights: a classifier on fewer than 1,000 images starts from torchvision's ImageNet weights
  when they are in the local cache or can be downloaded; otherwise it trains from scratch with
  the small-data settings (weight decay 2 on every parameter, 6,000 steps on a GPU and 3,000 on
  the CPU: ``SMALL_DECAY``, ``SMALL_STEPS``) and a note says how to get the weights;
* quarter turns (class folders): on when no class has an up (``orientation_check``);
* image size: classification the median shorter side, detection / segmentation the median
  longer side, rounded to a multiple of 32 and kept within what trains in reasonable time
  (224 / 640 on a GPU, 128 / 224 on the CPU; 224 for an ImageNet-pretrained classifier);
* batch: what the device holds at that size (the GPU recipes' batch at their size, scaled
  by the pixel count; a small one on the CPU), at most an eighth of the training images, so
  that an epoch is at least 8 steps (a cap never under 8 images: BatchNorm);
* learning rate: AdamW at 2e-3 for batch 64 for the dense tasks (their recipes' measured rate)
  and 1e-3 for classification (AdamW's usual rate: the classification recipes use SGD), scaled
  by sqrt(batch / 64), the rule for Adam-type optimisers; a pretrained trunk trains at a tenth;
* epochs: enough for a number of optimizer steps (2,000 on a GPU, 600 on the CPU; the
  small-data settings above: 6,000 / 3,000), between 5 and 300 epochs (1,000 for the
  small-data ones), counting the steps training takes (an epoch's last partial batch is
  dropped); warm-up 5% of the steps (at least 50, at most 1,000), given in epochs;
* evaluation: every epoch up to 30 epochs, else about 30 times in the run;
* workers: the CPUs this process may use, 8 at most, one left for the main process when
  training on the CPU.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["DataFacts", "Derived", "derive", "derivation_lines", "image_sample_stats", "data_name", "cpu_count",
           "Orientation", "orientation_check", "sample_by_class",
           ]

_SPLIT_WORDS = {"train", "training", "trainval", "val", "valid", "validation", "test", "images", "imgs", "img", "image",
                "jpegimages", "annotations", "annotation", "ann", "anns", "masks", "labels", "data", "dataset",
                "images_train", "train_images"}


@dataclass
class DataFacts:
    """What a task reads off the user's data before building anything."""

    kind: str                 # folders | coco | masks | voc (data.dataset)
    name: str                 # the run folder's name (runs/<task>/<name>-N)
    where: str                # the training data, as the user named it
    train: int                # training images
    val: int                  # validation images
    class_names: list[str]    # as the model predicts them (segmentation: background first)
    classes_from: str         # where the names came from
    median_size: tuple[int, int]  # (width, height) over a sample of training images
    channels: int = 3         # 1: every sampled image is grayscale
    record_classes: bool = False  # the datasets need data.classes (VOC layout, mask folders)
    numbered: bool = False    # the names are only numbers (mask ids): a user's model.num_classes decides the count
    # class folders: looks at the images and says whether they have an up (decodes a sample: called
    # only where a rule uses it, not under a named recipe); None: not looked at
    orientation: Callable[[], Orientation] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Derived:
    key: str
    value: Any
    why: str
    yours: bool = False  # the user set it: kept as given


def cpu_count() -> int:
    """The CPUs this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def data_name(path: str | os.PathLike) -> str:
    """A run-folder name for the data at ``path``: its folder's name, or the first folder above
    it whose name is not a split or role word (``data/pets/train`` -> ``pets``,
    ``shapes/train.json`` -> ``shapes``)."""
    p = Path(path).expanduser().resolve()
    for part in (p.stem if p.is_file() else p.name, *(q.name for q in p.parents)):
        word = part.lower()
        if not word or word in _SPLIT_WORDS or word.startswith("instances_"):
            continue
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in part)
    return "data"


def image_sample_stats(paths: Sequence[str | os.PathLike], k: int = 200, seed: int = 0
                       ) -> tuple[tuple[int, int], int]:
    """``((median width, median height), channels)`` of up to ``k`` of ``paths`` drawn with
    ``seed``, from the file headers (nothing is decoded); channels 1 when every sampled image
    is grayscale. Unreadable files are left out here (the datasets name them)."""
    from PIL import Image

    from tasks.data.images import read_image_size

    rng = np.random.default_rng(seed)
    pick = [paths[i] for i in sorted(rng.choice(len(paths), size=min(k, len(paths)), replace=False))]
    widths, heights, gray = [], [], True
    for path in pick:
        try:
            h, w = read_image_size(path)
            if gray:
                with Image.open(path) as im:  # opens the header only
                    gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
        except Exception:  # noqa: BLE001 - any reader error: the dataset reports the file later
            continue
        widths.append(w)
        heights.append(h)
    if not widths:
        return (0, 0), 3
    return (int(statistics.median(widths)), int(statistics.median(heights))), 1 if gray else 3


@dataclass
class Orientation:
    free: bool  # no class looks different turned by 90 degrees: quarter turns keep every label
    why: str


ORIENTATION_SIDE = 32
ORIENTATION_Z = 4.0


def orientation_check(images_by_class: Mapping[str, Sequence[np.ndarray]]) -> Orientation:
    """Whether the images of each class look the same turned by a quarter turn, from two
    statistics of each class's images (grayscale, ``ORIENTATION_SIDE`` px square, each scaled
    to mean 0 and std 1), each a z-score against its own sampling noise:

    * the class's mean image against itself turned by 90 / 270 degrees: the squared difference
      over twice the summed variance of the mean's pixels (about 1 or less when the turned mean
      differs only by noise: the turns of an unbiased mean differ by noise alone);
    * the balance of horizontal and vertical gradient energy, (gx^2 - gy^2) / (gx^2 + gy^2)
      per image: its mean over the class in standard errors (a quarter turn swaps gx and gy).

    Free when every class is under ``ORIENTATION_Z`` in both. Measured with ``sample_by_class``'s
    sample: eight 200-image sets of coloured shapes at any rotation (``benchmarks.shapes
    --folders``) score at most 1.2 on the mean image and 2.0 on the edges (a z-score: 4 classes,
    2 is chance); every Fashion-MNIST class (upright clothes) scores 6.8 or more on one of the
    two, the most upright class 50-95 (20-32 images a class)."""
    worst: tuple[float, str, str] = (0.0, "", "")
    for name, images in images_by_class.items():
        if len(images) < 4:
            continue
        x = np.stack([_small_gray(im) for im in images]).astype(np.float64)
        x -= x.mean(axis=(1, 2), keepdims=True)
        x /= x.std(axis=(1, 2), keepdims=True) + 1e-6
        n = len(x)
        mean = x.mean(0)
        noise = 2 * x.var(0, ddof=1).sum() / n
        z_mean = min(float(((mean - np.rot90(mean, k)) ** 2).sum()) for k in (1, 3)) / max(noise, 1e-12)
        gx, gy = np.diff(x, axis=2)[:, :-1, :], np.diff(x, axis=1)[:, :, :-1]
        ex, ey = (gx ** 2).sum((1, 2)), (gy ** 2).sum((1, 2))
        balance = (ex - ey) / np.maximum(ex + ey, 1e-12)
        z_grad = abs(float(balance.mean())) / max(float(balance.std(ddof=1)) / math.sqrt(n), 1e-12)
        for z, what in ((z_mean, "mean pixels"), (z_grad, "horizontal and vertical edges")):
            if z > worst[0]:
                worst = (z, name, what)
    z, name, what = worst
    if z > ORIENTATION_Z:
        return Orientation(False, f"class {name!r} has an up: turned by 90 degrees, its {what} differ beyond "
                                  f"noise (z {z:.1f} > {ORIENTATION_Z:g})")
    return Orientation(True, f"no class has an up: turned by 90 degrees, each class's mean image and edge "
                             f"directions change by noise only (z <= {max(z, 0.0):.1f})")


def _small_gray(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.ndim == 3:
        image = image.mean(axis=2)
    return cv2.resize(image.astype(np.float32), (ORIENTATION_SIDE, ORIENTATION_SIDE), interpolation=cv2.INTER_AREA)


def sample_by_class(samples: Sequence[tuple[str | os.PathLike, int]], classes: Sequence[str], per_class: int = 32,
                    total: int = 256, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Up to ``per_class`` images of each class (at most ``total`` in all, 8 a class at least),
    drawn with ``seed``, as small grayscale arrays: what ``orientation_check`` looks at. JPEGs
    decode at a reduced scale (PIL's draft mode: a 12-megapixel photo in about half the time of a
    full decode), EXIF orientation applied. Unreadable files are left out here (the datasets name
    them)."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    k = max(1, min(per_class, max(8, total // max(len(classes), 1))))
    out: dict[str, list[np.ndarray]] = {}
    for label, name in enumerate(classes):
        paths = [p for p, y in samples if y == label]
        for i in sorted(rng.choice(len(paths), size=min(k, len(paths)), replace=False)) if paths else []:
            try:
                with Image.open(paths[i]) as im:
                    im.draft("L", (4 * ORIENTATION_SIDE, 4 * ORIENTATION_SIDE))
                    small = ImageOps.exif_transpose(im).convert("L").resize((ORIENTATION_SIDE, ORIENTATION_SIDE),
                                                                            Image.BOX)
                out.setdefault(name, []).append(np.asarray(small, dtype=np.float32))
            except Exception:  # noqa: BLE001 - any reader error: the dataset reports the file later
                continue
    return out


def _round32(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 32 * round(x / 32))))


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


# A classifier on fewer images than this starts from ImageNet weights when they are cached or can be
# downloaded; otherwise it gets the small-data settings below and a note. With the settings of a
# larger set (decay 0.05, 600 / 2,000 steps), 200 images of coloured shapes stayed at 0.285-0.365
# (chance 0.25) while the training accuracy reached 98%; the derived CPU run on 1,000 images of the
# shapes reached 0.945. Where between 200 and 1,000 the short run starts to do is not measured.
FEW_IMAGES = 1000
# From scratch on fewer than FEW_IMAGES images (no ImageNet weights to be had): AdamW weight decay
# SMALL_DECAY on every parameter, norm weights included, over a long run. The run learns the images
# by heart first and generalises late. Three 200-image shape sets (tuning; H100, the command with
# --set variants): the run of before (decay 0.05; 600 CPU / 2,000 GPU steps) 0.325 / 0.355 median;
# decay 2 with quarter turns 0.41 at 1,500 steps, 0.71 at 3,000; decay 0.05 with the turns at 3,000:
# 0.425; decay 2 without them at 3,000: 0.465. Three other sets, these settings: 0.695-0.82 at
# 3,000 steps, 0.955-0.98 at 6,000 (docs/USAGE.md). On the CPU the run stops at 3,000 steps: the
# derived CPU run reached 0.875 and 0.755 on two held-out sets (seeds 9 and 21, training seeds 0
# and 1) in 1,924 / 1,554 s of training on two cores (96 px);
# 6,000 would take twice that.
SMALL_DECAY = 2.0
SMALL_BATCH = 16  # at most: 200 images give 16 (1/8 of the set); 600 images would get 64, and
                  # 3,000 steps of 64 at the measured CPU rate (25 images/s at 96 px) are about 2 hours
SMALL_STEPS = {"cuda": 6000, "cpu": 3000}


def derive(task: str, facts: DataFacts, *, device: str, given: Mapping[str, Any], named_recipe: bool = False,
           pretrained: bool = False, cpus: int | None = None,
           imagenet_source: Callable[[], str | None] | None = None) -> list[Derived]:
    """The settings for ``facts`` on ``device`` ("cuda" or "cpu"). ``given``: the user's own
    settings (``{"train.batch_size": 16}``), listed as theirs and used by the rules after them
    (the learning rate of the user's batch). Under ``named_recipe`` only the facts: the dataset
    kind, channels, class count and names. A classifier on fewer than ``FEW_IMAGES`` images
    without weights of the user's starts from ImageNet weights when ``imagenet_source()`` says
    where they come from (``"cache"`` or ``"download"``; ``backbones.pretrained.source``);
    otherwise (None) it gets a note in ``facts.notes`` (printed with the derivation)."""
    cpus = cpus or cpu_count()
    gpu = device == "cuda"
    dense = task != "classify"
    k = len(facts.class_names)
    out: list[Derived] = []

    def add(key: str, value: Any, why: str) -> Any:
        """Record ``key``; returns the value in use (the user's where given: the rules after it use it)."""
        out.append(Derived(key, given.get(key, value), why, yours=key in given))
        return out[-1].value

    add("data.dataset", facts.kind, f"{facts.where}")
    if not dense:
        add("model.in_chans", facts.channels, "every sampled image is grayscale" if facts.channels == 1 else
            "colour images")
    names = list(facts.class_names)
    if facts.numbered and "model.num_classes" in given:  # the user's count over the largest id seen
        names = ["background", *(f"class_{i}" for i in range(1, int(given["model.num_classes"])))]
    add("model.num_classes", k, f"{facts.classes_from}: {_names(facts.class_names)}")
    if facts.record_classes:
        add("data.classes", names, "the class names the datasets read the labels with")
    if named_recipe:
        return out

    if not dense and not pretrained and facts.train < FEW_IMAGES and "model.weights" not in given:
        where = imagenet_source() if imagenet_source is not None else None
        if where is not None:
            add("model.weights", "imagenet", f"{facts.train} images are few to train a ResNet from scratch: "
                "torchvision's ImageNet weights, " + ("found in the cache" if where == "cache" else
                                                      "downloaded once into torch.hub's cache"))
            pretrained = True
        else:
            facts.notes.append(f"{facts.train} training images and a trunk from scratch: the small-data settings "
                               "(a long run, strong weight decay) get further than a short run, but less far "
                               "than ImageNet weights, which are neither in the cache nor downloadable here "
                               "(--set model.weights=imagenet names the file and where to put it)")
    # from scratch on few images: the small-data rules (weight decay, run length) below
    scratch = not dense and not pretrained and facts.train < FEW_IMAGES

    if not dense and facts.orientation is not None:
        orientation = facts.orientation()
        add("data.rot90", orientation.free, orientation.why)

    w, h = facts.median_size
    if dense:
        # on the CPU at most 224 px, where 8 images fit the CPU's pixel budget: at 320 px it was 4,
        # and the derived CPU runs on 300 shapes images learnt far less in the same time (detection
        # AP 0.177 at 320 px / batch 4 against 0.376 at 224 / 8; segmentation mIoU 0.329 against 0.612)
        hi = 640 if gpu else 224
        size = _round32(max(w, h), 128, hi) if w else 256
        size = add("data.image_size", size, f"median longer side {max(w, h)} px, as a multiple of 32 in 128..{hi}"
            f"{'' if gpu else ' (CPU)'}")
        per_device = 64 * (256 / size) ** 2 if gpu else 8 * (256 / size) ** 2
        ref = "64 at 256 px on a GPU (the FashionScenes recipe)" if gpu else "8 at 256 px on the CPU"
    else:
        hi = 224 if gpu or pretrained else 128
        if pretrained:
            size = 224
            why = "the ImageNet size of the pretrained trunk"
        else:
            size = _round32(min(w, h), 32, hi) if w else 64
            why = f"median shorter side {min(w, h)} px, as a multiple of 32 in 32..{hi}{'' if gpu else ' (CPU)'}"
        size = add("data.image_size", size, why)
        most = 256 if gpu else 64  # up to 128 px, then fewer as the pixels grow
        per_device = min(most, most * (128 / size) ** 2)
        ref = f"{most} up to 128 px on {'a GPU' if gpu else 'the CPU'}"
    # at least 8 steps per epoch where the data allows it, a cap that never takes the batch under
    # 8 images (BatchNorm statistics of fewer are noise; the device's own batch may be smaller
    # where the user's image size asks for it), nor over the images there are
    batch = min(_pow2_floor(per_device), max(8, _pow2_floor(facts.train / 8)), _pow2_floor(max(facts.train, 1)))
    why = f"{ref}, scaled by pixels; at most 1/8 of {facts.train} images (a cap never under 8)"
    if scratch and batch > SMALL_BATCH:  # the measured small-data run; its steps stay as long on the CPU
        batch, why = SMALL_BATCH, "few images from scratch: the batch the small-data settings were measured with"
    batch = add("train.batch_size", batch, why)
    add("data.eval_batch_size", batch * 2, "twice the training batch (no gradients)")

    base = 2e-3 if dense else 1e-3
    lr = float(f"{base * math.sqrt(batch / 64):.3g}")
    add("optim.name", "adamw", "AdamW: the optimizer of the measured dense recipes, robust to the batch size")
    add("optim.lr", lr, f"{base:g} at batch 64 scaled by sqrt({batch}/64)")
    if scratch:
        add("optim.weight_decay", SMALL_DECAY, f"{facts.train} images from scratch: strong decay makes the long run "
            "generalise instead of learning the images by heart")
        add("optim.norm_weight_decay", SMALL_DECAY, "the same on norm weights and biases")
    else:
        add("optim.weight_decay", 0.05, "AdamW's usual 0.05")
    add("optim.schedule", "cosine", "cosine decay after the warm-up")
    if pretrained:
        add("optim.trunk_lr_mult", 0.1, "a pretrained trunk trains at a tenth of the head's rate")
    if dense:
        add("optim.clip_grad_norm", 10.0, "the dense recipes' gradient clipping")

    steps_per_epoch = max(1, facts.train // batch)  # training drops an epoch's last partial batch
    most = 300
    if scratch:
        target = SMALL_STEPS["cuda" if gpu else "cpu"]
        unit = " (few images from scratch: the later steps generalise" + ("" if gpu else
            f"; {SMALL_STEPS['cuda']:,} on a GPU") + ")"
        most = 1000
    else:
        target, unit = (2000, "") if gpu else (600, " (CPU)")
    epochs = int(min(most, max(5, math.ceil(target / steps_per_epoch))))
    epochs = add("train.epochs", epochs, f"about {target:,} steps{unit} at {steps_per_epoch} steps per epoch, "
                 f"within 5..{most}")
    total = epochs * steps_per_epoch
    # a short run (the user's --epochs) still decays: all warm-up, it would end at the peak rate
    warm = min(1000, max(50, round(0.05 * total)))
    why = f"{warm} warm-up steps: 5% of {total} (50..1000)"
    if warm > max(1, total // 5):
        warm = max(1, total // 5)
        why = f"{warm} warm-up step{'s' if warm > 1 else ''}: a fifth of the run's {total}"
    add("optim.warmup_epochs", round(warm / steps_per_epoch, 2), why)
    add("train.eval_every", max(1, math.ceil(epochs / 30)), "about 30 evaluations in the run")
    workers = min(8, cpus if gpu else max(cpus - 1, 0))
    add("data.num_workers", workers, f"{cpus} CPUs{'' if gpu else ', one kept for training on the CPU'}, 8 at most")
    return out


def _names(names: Sequence[str], show: int = 8) -> str:
    head = ", ".join(names[:show])
    return head + (f", ... ({len(names)})" if len(names) > show else "")


def derivation_lines(facts: DataFacts, derived: Sequence[Derived], values: dict[str, Any]) -> list[str]:
    """What the run prints at the start (and config.yaml keeps as comments): the data in one
    line, then each derived key with its value and why."""
    w, h = facts.median_size
    chans = "grayscale" if facts.channels == 1 else "RGB"
    lines = [f"data: {facts.train} train / {facts.val} val images in {len(facts.class_names)} classes, {chans}, "
             f"median {w}x{h} ({facts.where}); settings made for it:"]
    width = max(len(d.key) for d in derived)
    for d in derived:
        value = values.get(d.key, d.value)
        shown = _names(value) if isinstance(value, (list, tuple)) else value
        why = "yours" if d.yours else d.why
        lines.append(f"  {d.key:<{width}}  {shown}  ({why})")
    lines.extend(f"  note: {n}" for n in facts.notes)
    return lines

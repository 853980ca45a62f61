"""FashionScenes: Fashion-MNIST items composed into RGB scenes, written as a standard dataset.

    python -m tasks.data.scenes --out DIR --train 8000 --val 1000 --size 256 --seed 0 \\
        [--min-items 2 --max-items 8 --workers N --data-dir FMNIST --preview grid.png --quiet]

Each scene holds 2-8 items, each scaled 1x-4x, tinted with its own colour and painted over a
textured background; later items occlude earlier ones. Train scenes draw their items from the
Fashion-MNIST train split, val scenes from the test split. The output is what a user's own data
would look like, so detection and segmentation read it through the ordinary loaders::

    DIR/images/{train,val}/000000.png        RGB scene
    DIR/masks/{train,val}/000000.png         'L' label map: 0 background, class+1, 255 ignore
    DIR/annotations/instances_{train,val}.json   COCO: visible-part boxes, RLE masks, iscrowd=0
    DIR/DONE.json                            written last: the arguments, marks it complete

(while it is being written the folder also holds ``.fashionscenes``, the generator's mark,
replaced by ``DONE.json`` at the end).

An item's alpha comes from its gray level. A pixel is labelled with the topmost item that covers
it at alpha >= 1/2; pixels where an item is only partly there (its soft border) are 255, because
they mix two labels. Items left with little visible area are dropped from the annotations and
their visible pixels become 255, so no loss is asked to find an object nobody could see.

Output is a pure function of the arguments (one random generator per scene, seeded from
``(seed, split, index)``), so the worker count does not change a byte.

The generator only ever writes into, or deletes, a folder it made: an empty or new one, or one
holding its mark (``.fashionscenes`` while it writes, then ``DONE.json`` and the COCO files'
``info.generator``) and nothing else it would not write. Any other folder (a user's own dataset
with ``images/`` and ``annotations/``, say) is refused with its name and left untouched.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

__all__ = ["NUM_CLASSES", "IGNORE_INDEX", "generate_scenes", "ensure_scenes", "default_root", "render_preview", "get_args_parser", "main"]

NUM_CLASSES = 10
IGNORE_INDEX = 255
# Bump when the same arguments would give different files: ensure_scenes then regenerates.
FORMAT = "fashionscenes-1"
# our split -> (Fashion-MNIST split it draws items from, id mixed into the per-scene seed)
SPLITS = {"train": ("train", 0), "val": ("test", 1)}
DONE = "DONE.json"
# Written first into every folder generate_scenes fills, so that a folder it was interrupted in
# is still recognisably its own; removed once DONE.json (written last) marks the folder.
MARKER = ".fashionscenes"
GENERATOR = "tasks.data.scenes"  # the COCO files' info.generator
MIN_SIZE = 64
ITEM_SIDE = 28
MIN_SCALE, MAX_SCALE = 1.0, 4.0
# Gray levels (0..255) of the item image. At ALPHA_FULL and above an item is opaque; below it
# is see-through in proportion, which is what makes its border soft.
ALPHA_FULL = 64
LABEL_LEVEL = ALPHA_FULL // 2   # alpha >= 1/2: the pixel shows more item than what lies below
MIXED_LEVEL = ALPHA_FULL // 8   # alpha in [1/8, 1/2): a blend of two labels -> ignore
# An item keeps its annotation only if this much of its own mask is still visible ...
MIN_VISIBLE_FRACTION = 0.4
# ... and at least this many pixels (an 8x8 patch): smaller ones are noise to a detector.
MIN_VISIBLE_AREA = 64
SCENES_PER_JOB = 64  # enough work per task that pool overhead is negligible
_MIXED = -1          # instance-map value of a mixed (ignored) pixel; 0 = background
_INDEX_PNG = re.compile(r"\d{6,}\.png")


# ----------------------------------------------------------------------------- helpers
def _check_args(*, train, val, size, seed, min_items=2, max_items=8, workers=None, aspect=None) -> dict:
    """The arguments that decide the output, validated; errors name the argument."""
    def integer(name, value, low):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name}={value!r}: expected an integer")
        if value < low:
            raise ValueError(f"{name}={value}: must be >= {low}")
        return int(value)

    args = {"train": integer("train", train, 0), "val": integer("val", val, 0),
            "size": integer("size", size, MIN_SIZE), "seed": integer("seed", seed, 0),
            "min_items": integer("min_items", min_items, 1),
            "max_items": integer("max_items", max_items, 1)}
    if args["min_items"] > args["max_items"]:
        raise ValueError(f"min_items={min_items} is larger than max_items={max_items}")
    if aspect is not None:  # only then in args: the datasets made before it keep their records
        lo, hi = (float(v) for v in aspect)
        if not 0.25 <= lo <= hi <= 4.0:
            raise ValueError(f"aspect={tuple(aspect)}: expected width / height bounds with 0.25 <= low <= high <= 4")
        args["aspect"] = [lo, hi]
    if workers is not None:
        integer("workers", workers, 1)
    return args


def _hsv(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """A random RGB colour in [0, 1] with saturation and value drawn from the given ranges."""
    h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in ~[0, 1]: a gradient between two muted, darkish colours (so
    the bright tinted items stand out) with low-frequency colour blotches, sometimes stripes."""
    c0, c1 = (_hsv(rng, sat=(0.0, 0.5), val=(0.1, 0.55)) for _ in range(2))
    theta = rng.uniform(0.0, 2 * math.pi)
    # Gradient and blotches are smooth, so they are built on a k x k grid and upsampled:
    # bicubic to 32 x 32 (rounds the blotches), then bilinear to full size, because bicubic at
    # full size costs 15x more and looks the same.
    k = int(rng.integers(3, 8))
    ramp = np.linspace(0.0, 1.0, k)
    t = math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None]  # [k, k]
    t = (t - t.min()) / (t.max() - t.min())
    low = c0 + t[..., None] * (c1 - c0) + rng.normal(0.0, 0.06, size=(k, k, 3))  # [k, k, 3]
    low = cv2.resize(low.astype(np.float32), (32, 32), interpolation=cv2.INTER_CUBIC)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        phi, period = rng.uniform(0.0, math.pi), rng.uniform(6.0, 32.0)
        amp, phase = rng.uniform(0.02, 0.06), rng.uniform(0.0, 2 * math.pi)
        freq = np.arange(size, dtype=np.float32) * np.float32(2 * math.pi / period)
        ax, by = freq * np.float32(math.cos(phi)), freq * np.float32(math.sin(phi)) + np.float32(phase)
        # sin(ax + by) = sin(ax) cos(by) + cos(ax) sin(by): two outer products instead of a
        # sine per pixel.
        wave = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))  # [H, W]
        img += (np.float32(amp) * wave)[..., None]
    return img


# ----------------------------------------------------------------------------- one scene
def render_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int,
                 min_items: int, max_items: int, aspect: tuple[float, float] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene from the uint8 ``items`` [N, 28, 28] and their ``labels`` [N] (0..9).

    Returns the RGB image (uint8 [H, W, 3]), the label map (uint8 [H, W]) and the COCO
    annotations of the kept items (without ids). ``aspect``: crop the square scene to a
    random width / height in ``[low, high]`` (log-uniform; the longer side stays ``size``),
    as photos are; items mostly cut off are dropped by the visibility rules."""
    n = int(rng.integers(min_items, max_items + 1))
    img = _background(rng, size)
    inst = np.zeros((size, size), np.int32)  # which item (1..n) is on top; 0 bg, _MIXED mixed
    own_area = np.zeros(n + 1, np.int64)
    cats = np.zeros(n + 1, np.int64)
    for k, pick in enumerate(rng.integers(len(items), size=n), start=1):
        side = min(size, round(ITEM_SIDE * rng.uniform(MIN_SCALE, MAX_SCALE)))
        gray = cv2.resize(items[pick], (side, side), interpolation=cv2.INTER_LINEAR)
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        win = np.s_[y0:y0 + side, x0:x0 + side]
        colour = _hsv(rng, sat=(0.45, 1.0), val=(0.65, 1.0))
        alpha = np.minimum(gray * np.float32(1 / ALPHA_FULL), 1.0)[..., None]  # [s, s, 1]
        # Shading the tint by the gray level keeps the item's own folds and seams visible.
        shade = colour * (0.45 + gray[..., None] * np.float32(0.55 / 255))  # [s, s, 3]
        img[win] += alpha * (shade - img[win])
        labelled, mixed = gray >= LABEL_LEVEL, gray >= MIXED_LEVEL
        inst[win] = np.where(labelled, k, np.where(mixed, _MIXED, inst[win]))
        own_area[k], cats[k] = labelled.sum(), int(labels[pick]) + 1
    if aspect is not None:
        ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))  # width / height
        h, w = (round(size / ratio), size) if ratio >= 1 else (size, round(size * ratio))
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        img, inst = img[y0:y0 + h, x0:x0 + w], np.ascontiguousarray(inst[y0:y0 + h, x0:x0 + w])

    visible = np.bincount(np.maximum(inst, 0).ravel(), minlength=n + 1)
    keep = (visible >= MIN_VISIBLE_AREA) & (visible >= MIN_VISIBLE_FRACTION * own_area)
    keep[0] = False
    # Lookup indexed by inst + 1: mixed -> ignore, background -> 0, item -> class or ignore.
    lut = np.full(n + 2, IGNORE_INDEX, np.uint8)
    lut[1] = 0
    lut[2:][keep[1:]] = cats[keep]
    semantic = lut[inst + 1]

    anns = []
    kept = np.flatnonzero(keep)
    if kept.size:
        # pycocotools wants Fortran order: compare on the transposed map, [K, W, H] in C order,
        # and transpose the view back to [H, W, K] instead of copying.
        masks = (np.ascontiguousarray(inst.T) == kept[:, None, None]).view(np.uint8).transpose(2, 1, 0)
        rles = mask_utils.encode(masks)
        for k, rle, area, box in zip(kept, rles, mask_utils.area(rles), mask_utils.toBbox(rles)):
            anns.append({"category_id": int(cats[k]), "bbox": [float(v) for v in box],
                         "area": int(area), "segmentation": {"size": list(inst.shape),
                                                            "counts": rle["counts"].decode("ascii")},
                         "iscrowd": 0})
    img *= 255
    img += 0.5  # round to nearest when truncating below
    rgb = np.clip(img, 0, 255, out=img).astype(np.uint8)
    return rgb, semantic, anns


# ----------------------------------------------------------------------------- workers
_WORKER_DATA: dict = {}


def _init_worker(data: dict) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    cv2.setNumThreads(1)  # the pool already uses every core; nested threads only contend


def _write_png(path: Path, array: np.ndarray) -> None:
    # cv2 writes BGR; zlib at a fixed level is deterministic, so equal arrays give equal bytes.
    if not cv2.imwrite(str(path), array[..., ::-1] if array.ndim == 3 else array):
        raise OSError(f"{path}: could not write PNG")


def _render_job(job: tuple, data: dict | None = None) -> list[list[dict]]:
    """Render and write scenes ``start..stop`` of ``split``; return their annotations."""
    out_dir, split, start, stop, args = job
    items, labels = (data or _WORKER_DATA)[split]
    out_dir, split_id = Path(out_dir), SPLITS[split][1]
    result = []
    for index in range(start, stop):
        rng = np.random.default_rng(np.random.SeedSequence([args["seed"], split_id, index]))
        rgb, semantic, anns = render_scene(rng, items, labels, args["size"],
                                           args["min_items"], args["max_items"], args.get("aspect"))
        _write_png(out_dir / "images" / split / f"{index:06d}.png", rgb)
        _write_png(out_dir / "masks" / split / f"{index:06d}.png", semantic)
        result.append({"size": semantic.shape, "annotations": anns})
    return result


def _coco(split: str, args: dict, per_image: list[list[dict]]) -> dict:
    from tasks.data.fashion_mnist import CLASSES

    images, annotations = [], []
    for index, scene in enumerate(per_image):
        h, w = scene["size"]
        # ids start at 1 as in COCO itself; tools that test ids for truth break on 0
        images.append({"id": index + 1, "file_name": f"{index:06d}.png", "width": int(w), "height": int(h)})
        for ann in scene["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    return {
        "info": {"description": "FashionScenes: Fashion-MNIST items composed into scenes",
                 "version": FORMAT, "generator": GENERATOR, "split": split,
                 "fashion_mnist_split": SPLITS[split][0], "args": args},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "fashion"}
                       for i, name in enumerate(CLASSES)],
    }


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then renamed over it: a crash leaves the
    previous file whole. (tasks.engine.checkpoint.write_atomic does this for the engine; the
    data layer does not import the engine.)"""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write leaves no temporary file behind
        if tmp.exists():
            tmp.unlink()


def _write_json_atomic(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, separators=(",", ":"))))


def _done_record(args: dict) -> dict:
    return {"format": FORMAT, "args": args}


def _read_done(root: Path) -> dict | None:
    try:
        return json.loads((root / DONE).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale(folder: Path, count: int) -> None:
    """Drop scene files of an earlier, larger run: a mask-folder loader would list them."""
    for path in folder.glob("*.png"):
        if _INDEX_PNG.fullmatch(path.name) and int(path.stem) >= count:
            path.unlink()


# ----------------------------------------------------------------------------- public API
def generate_scenes(out_dir, *, train: int = 8000, val: int = 1000, size: int = 256, seed: int = 0,
                    min_items: int = 2, max_items: int = 8, data_dir=None, workers: int | None = None,
                    progress: bool = True, aspect: tuple[float, float] | None = None) -> Path:
    """Write the dataset into ``out_dir`` (created; earlier scene files replaced) and return it."""
    args = _check_args(train=train, val=val, size=size, seed=seed, min_items=min_items,
                       max_items=max_items, workers=workers, aspect=aspect)
    from tasks.data.fashion_mnist import load_fashion_mnist  # imports torch: keep it out of workers' way

    out = Path(out_dir)
    _claim(out, "out_dir")  # a user's folder: refused before anything in it is written or deleted
    out.mkdir(parents=True, exist_ok=True)
    # First: an interrupted generation leaves a folder that is recognisably ours.
    _write_json_atomic(out / MARKER, {"generator": GENERATOR, "format": FORMAT})
    # The old marker must not vouch for a folder that is being rewritten.
    (out / DONE).unlink(missing_ok=True)
    counts = {split: args[split] for split in SPLITS}
    data = {}
    for split, count in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "masks" / split).mkdir(parents=True, exist_ok=True)
        if count:
            items, labels = load_fashion_mnist(SPLITS[split][0], data_dir=data_dir)
            data[split] = (items.numpy(), labels.numpy())
    (out / "annotations").mkdir(exist_ok=True)

    jobs = [(str(out), split, start, min(start + SCENES_PER_JOB, count), args)
            for split, count in counts.items() for start in range(0, count, SCENES_PER_JOB)]
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    per_image = {split: [] for split in SPLITS}
    # disable=None: tqdm turns itself off when stderr is not a terminal
    with tqdm(total=sum(counts.values()), desc="FashionScenes", unit="scene",
              disable=None if progress else True) as bar:
        if workers == 1:
            results = (_render_job(job, data) for job in jobs)
            pool = None
        else:
            import multiprocessing

            # forked with cv2 at one thread (tasks/data/__init__.py says why)
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(data,))
            results = pool.imap(_render_job, jobs)  # in job order, so ids do not depend on timing
        try:
            for job, chunk in zip(jobs, results):
                per_image[job[1]].extend(chunk)
                bar.update(len(chunk))
        except BaseException:
            if pool is not None:  # an error or Ctrl-C: the workers are stopped mid-job
                pool.terminate()
                pool.join()
            raise
        if pool is not None:  # every job done: the workers leave on their own (no signal to miss)
            pool.close()
            pool.join()

    for split, count in counts.items():
        _write_json_atomic(out / "annotations" / f"instances_{split}.json", _coco(split, args, per_image[split]))
        _remove_stale(out / "images" / split, count)
        _remove_stale(out / "masks" / split, count)
    _write_json_atomic(out / DONE, _done_record(args))  # last: marks the folder complete
    (out / MARKER).unlink(missing_ok=True)  # DONE.json marks it from now on
    return out


def default_root(*, train: int = 8000, val: int = 1000, size: int = 256, seed: int = 0,
                 aspect: tuple[float, float] | None = None) -> Path:
    """``$ONETRUNK_DATA/scenes-{size}-{train}-{val}-s{seed}[-a{low}-{high}]`` (``~/.cache/onetrunk``
    by default)."""
    base = Path(os.environ.get("ONETRUNK_DATA") or Path.home() / ".cache" / "onetrunk").expanduser()
    tag = f"-a{float(aspect[0]):g}-{float(aspect[1]):g}" if aspect is not None else ""
    return base / f"scenes-{size}-{train}-{val}-s{seed}{tag}"


def _ours(root: Path) -> bool:
    """Whether ``root`` holds nothing but what generate_scenes writes (entry names only; see
    ``_claim`` for the test that decides whether a folder may be written into or deleted)."""
    return all(p.name in {"images", "masks", "annotations", DONE, DONE + ".tmp", MARKER} for p in root.iterdir())


def _marked(root: Path) -> bool:
    """Whether the generator made ``root``: its mark of a generation under way, a DONE.json of
    this generator's format, or (a complete folder whose DONE.json was deleted) a COCO file
    whose ``info.generator`` is this module."""
    if (root / MARKER).is_file():
        return True
    done = _read_done(root)
    if isinstance(done, dict) and str(done.get("format", "")).startswith("fashionscenes-"):
        return True
    for split in ("val", "train"):  # val first: the smaller file
        try:
            info = json.loads((root / "annotations" / f"instances_{split}.json").read_text()).get("info", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(info, dict) and info.get("generator") == GENERATOR:
            return True
    return False


def _foreign_entries(root: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` paths under ``root`` (relative) that generate_scenes would not write."""
    allowed_json = {f"instances_{split}.json" for split in SPLITS}
    allowed_json |= {name + ".tmp" for name in allowed_json}
    foreign: list[str] = []

    def add(rel: str) -> bool:
        foreign.append(rel)
        return len(foreign) >= limit

    for top in sorted(root.iterdir()):
        if top.name in (DONE, DONE + ".tmp", MARKER, MARKER + ".tmp") and top.is_file() and not top.is_symlink():
            continue
        if top.name in ("images", "masks") and top.is_dir() and not top.is_symlink():
            for split in sorted(top.iterdir()):
                if split.name not in SPLITS or not split.is_dir() or split.is_symlink():
                    if add(f"{top.name}/{split.name}"):
                        return foreign
                    continue
                for f in split.iterdir():
                    if not (_INDEX_PNG.fullmatch(f.name) and f.is_file() and not f.is_symlink()):
                        if add(f"{top.name}/{split.name}/{f.name}"):
                            return foreign
            continue
        if top.name == "annotations" and top.is_dir() and not top.is_symlink():
            for f in sorted(top.iterdir()):
                if not (f.name in allowed_json and f.is_file() and not f.is_symlink()):
                    if add(f"annotations/{f.name}"):
                        return foreign
            continue
        if add(top.name):
            return foreign
    return foreign


def _claim(root: Path, what: str = "root") -> None:
    """Refuse to write into ``root`` (and so to delete anything in it) unless it is missing,
    empty, or a scene folder of this generator holding nothing else: a user's folder pointed at
    by mistake must come out untouched. ``what`` names the argument in the error."""
    if not os.path.lexists(root):
        return
    if not root.is_dir():
        raise FileExistsError(f"{what} {root} exists and is not a folder; pass another {what}")
    if next(root.iterdir(), None) is None:
        return
    if not _marked(root):
        raise FileExistsError(f"{what} {root} exists and is not a FashionScenes dataset (it holds no {MARKER} or "
                              f"{DONE} of tasks.data.scenes): it was left untouched; pass another {what} or an "
                              "empty folder")
    foreign = _foreign_entries(root)
    if foreign:
        raise FileExistsError(f"{what} {root} is a FashionScenes dataset but also holds files the generator did not "
                              f"write ({', '.join(foreign)}): it was left untouched; move them out or pass another "
                              f"{what}")


def ensure_scenes(root=None, *, train: int = 8000, val: int = 1000, size: int = 256, seed: int = 0,
                  data_dir=None, progress: bool = True, aspect: tuple[float, float] | None = None) -> Path:
    """A complete dataset folder for these arguments, generated only if missing or incomplete.

    Generation goes into a fresh temporary sibling that is renamed into place at the end, so an
    interrupted run leaves no half dataset behind ``root``. An existing ``root`` is replaced only
    when it is empty or a scene folder of this generator (``_claim``); any other folder is a
    ``FileExistsError`` naming it, and nothing in it is touched. With several processes (DDP),
    call it on one rank first and let the others wait, or each rank will generate its own copy."""
    args = _check_args(train=train, val=val, size=size, seed=seed, aspect=aspect)
    root = Path(root).expanduser() if root is not None else default_root(train=train, val=val, size=size, seed=seed,
                                                                         aspect=aspect)
    if _read_done(root) == _done_record(args):
        return root
    _claim(root, "data.scenes_root")  # before generating: a user's folder is refused at once, not after minutes
    # A symbolic link (the cache moved to another disk) stays: the folder it points at is replaced.
    target = root.resolve() if root.is_symlink() else root
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh folder of our own (mkdtemp): never one that happens to be there already.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        generate_scenes(tmp, train=train, val=val, size=size, seed=seed, data_dir=data_dir, progress=progress,
                        aspect=aspect)
        if _read_done(root) == _done_record(args):  # another process finished first
            return root
        if os.path.lexists(target):
            _claim(target, "data.scenes_root")  # again, just before it goes: nothing was added meanwhile
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(target, old)  # out of the way first: the new folder then takes its name at once
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)  # a dataset of ours (checked above)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _palette() -> np.ndarray:
    """uint8 [256, 3]: background black, classes 1..10 in matplotlib's tab10, ignore white."""
    from matplotlib import colormaps

    palette = np.full((256, 3), 128, np.uint8)
    palette[0] = 0
    palette[1:NUM_CLASSES + 1] = (np.asarray(colormaps["tab10"].colors) * 255).round().astype(np.uint8)
    palette[IGNORE_INDEX] = 255
    return palette


def render_preview(root, out_png, split: str = "val", n: int = 9) -> Path:
    """Save a picture of the first ``n`` scenes of ``split``: boxes and class names drawn on the
    images (grid on the left), the label maps coloured the same way (grid on the right)."""
    import torch
    from PIL import Image
    from torchvision.ops import box_convert
    from torchvision.utils import draw_bounding_boxes, make_grid

    root, out_png = Path(root), Path(out_png)
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = coco["images"][:n]
    if not images:
        raise ValueError(f"{root}: split {split!r} has no images to preview")
    by_image = {im["id"]: [] for im in images}
    for ann in coco["annotations"]:
        if ann["image_id"] in by_image:
            by_image[ann["image_id"]].append(ann)
    palette = _palette()
    scenes, label_maps = [], []
    for im in images:
        rgb = np.array(Image.open(root / "images" / split / im["file_name"]).convert("RGB"))
        anns = by_image[im["id"]]
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                            "xywh", "xyxy")
        boxes[:, 2:] -= 1  # COCO's x + w is one past the last pixel; PIL draws both ends
        colors = [tuple(int(c) for c in palette[a["category_id"]]) for a in anns]
        scenes.append(draw_bounding_boxes(torch.from_numpy(rgb).permute(2, 0, 1), boxes,
                                          labels=[names[a["category_id"]] for a in anns], colors=colors,
                                          width=2, fill_labels=True, label_colors="black"))
        label_map = np.array(Image.open(root / "masks" / split / im["file_name"]))
        label_maps.append(torch.from_numpy(palette[label_map]).permute(2, 0, 1))  # [3, H, W]
    nrow = math.ceil(math.sqrt(len(images)))
    from .images import pad_batch  # cropped (non-square) scenes: white beside them

    grids = [make_grid(pad_batch(t, 1, 255), nrow=nrow, padding=4, pad_value=255) for t in (scenes, label_maps)]
    picture = torch.cat(grids, dim=2)  # [3, H, 2W]: scenes beside their label maps
    _write_atomic(out_png, lambda tmp: Image.fromarray(picture.permute(1, 2, 0).numpy()).save(tmp))
    return out_png


# ----------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.data.scenes",
                                description="Generate the FashionScenes dataset (COCO JSON + PNG label maps).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=8000, help="number of train scenes (Fashion-MNIST train split)")
    p.add_argument("--val", type=int, default=1000, help="number of val scenes (Fashion-MNIST test split)")
    p.add_argument("--size", type=int, default=256, help=f"scene side in pixels (>= {MIN_SIZE})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-items", type=int, default=2)
    p.add_argument("--max-items", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="processes (default: os.cpu_count())")
    p.add_argument("--data-dir", default=None, help="folder holding the Fashion-MNIST IDX files")
    p.add_argument("--preview", default=None, metavar="PNG", help="also save a picture of 9 val scenes")
    p.add_argument("--aspect", default=None, metavar="LO,HI",
                   help="crop scenes to a width / height in [LO, HI] (e.g. 0.5,2): non-square images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> Path:
    parser = get_args_parser()
    a = parser.parse_args(argv)
    try:
        aspect = None
        if a.aspect:
            try:
                aspect = tuple(float(v) for v in a.aspect.split(","))
            except ValueError:
                raise ValueError(f"--aspect {a.aspect!r}: expected two numbers, LO,HI") from None
            if len(aspect) != 2:
                raise ValueError(f"--aspect {a.aspect!r}: expected two numbers, LO,HI")
        out = generate_scenes(a.out, train=a.train, val=a.val, size=a.size, seed=a.seed,
                              min_items=a.min_items, max_items=a.max_items, data_dir=a.data_dir,
                              workers=a.workers, progress=not a.quiet, aspect=aspect)
        if a.preview:
            render_preview(out, a.preview, split="val" if a.val else "train")
    except (ValueError, OSError) as e:  # bad flags, no Fashion-MNIST, a folder not ours: say so, no traceback
        parser.error(str(e))
    if not a.quiet:
        print(f"FashionScenes written to {out}" + (f", preview {a.preview}" if a.preview else ""))
    return out


if __name__ == "__main__":
    main()

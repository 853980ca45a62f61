"""From a data config to device-side loaders: the steps every file-based task repeats.

``data_files`` checks the data flags a task needs together (or generates FashionScenes once,
on rank 0, when none is given); ``file_loaders`` wraps a training and a validation dataset in
DataLoaders (workers decode and augment) whose batches arrive on the device normalised by
the task's ``Preprocess``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from tasks.data.coco import CocoDetection
from tasks.data.device_cache import DenseAugment, cache_nbytes, decode_dense
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD
from tasks.data.preprocess import Preprocess
from tasks.data.scenes import ensure_scenes
from tasks.data.transforms import SizedTransforms, detection_train_transforms
from tasks.data.voc import voc_detection

from . import distributed
from .config import DenseDataConfig
from .loaders import AspectBatchSampler, DenseTensorLoader, DeviceLoader, make_loader, normalize_images

__all__ = ["dense_preprocess", "dense_train_transforms", "data_files", "coco_sets", "unusable_samples", "file_loaders",
           "cache_mode",
           "cached_train_loader"]

# FashionScenes' files, by data flag
_SCENES = {"train_ann": "annotations/instances_train.json", "val_ann": "annotations/instances_val.json",
           "train_images": "images/train", "val_images": "images/val",
           "train_masks": "masks/train", "val_masks": "masks/val"}


def dense_preprocess(cfg: Any, meta: Mapping[str, Any] | None = None) -> Preprocess:
    """How detection, segmentation and multitask models see images: RGB files; the
    normalisation of ``meta``, else that of the trunk's weights (``model.weights`` by name, an
    onetrunk ``model.trunk``), else ImageNet's; the longer side to ``data.image_size`` (or
    ``meta["image_size"]`` of an old checkpoint), padded to a multiple of 32."""
    if cfg.model.in_chans != 3:
        raise ValueError(f"detection and segmentation read RGB files: model.in_chans must be 3 "
                         f"(got {cfg.model.in_chans})")
    meta = meta or {}
    mean, std = (meta["mean"], meta["std"]) if "mean" in meta else cfg.model.normalization() or (IMAGENET_MEAN,
                                                                                                IMAGENET_STD)
    d = cfg.data
    if d.resize not in ("square", "aspect"):
        raise ValueError(f"data.resize={d.resize!r}: choose square (FashionScenes) or aspect (photos)")
    if d.resize == "aspect":
        if not d.min_size or min(d.min_size) < 32:
            raise ValueError(f"data.min_size={list(d.min_size)}: expected shorter-side sizes of 32 pixels or more")
        return Preprocess(in_chans=3, mean=tuple(mean), std=tuple(std), resize="shorter", size=d.min_size[-1],
                          max_size=d.max_size)
    return Preprocess(in_chans=3, mean=tuple(mean), std=tuple(std), resize="longest",
                      size=int(meta.get("image_size", d.image_size)))


def dense_train_transforms(cfg: Any, *, boxes: bool) -> Any:
    """The training augmentation of the aspect mode (``SizedTransforms``: the batch's scale,
    flip), or None: the task's square-mode pipeline then."""
    d = cfg.data
    if d.resize != "aspect":
        return None
    return SizedTransforms(d.min_size, d.max_size, 0.5 if d.hflip else 0.0, boxes=boxes, seed=cfg.train.seed)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def data_files(d: DenseDataConfig, keys: Sequence[str], what: str, *, files: bool = False,
               quiet: bool = False) -> dict[str, str]:
    """``{key: path}`` for the data flags ``keys`` (``train_ann``, ``val_images``, ...): all from
    the config when any of them is set or ``files`` says so (``what`` names the data in the
    error when some are missing), else FashionScenes' files, generated into the cache on
    first use."""
    if files or any(getattr(d, k, None) for k in keys):
        missing = [_flag(k) for k in keys if not getattr(d, k, None)]
        if missing:
            raise ValueError(f"{what} needs {', '.join(missing)} as well")
        return {k: getattr(d, k) for k in keys}
    with distributed.main_first():  # under torchrun rank 0 generates, the others wait for it
        root = ensure_scenes(d.scenes_root, train=d.scenes_train, val=d.scenes_val, size=d.scenes_size,
                             seed=d.scenes_seed, data_dir=d.data_dir, progress=not quiet, aspect=d.scenes_aspect)
    return {k: str(Path(root) / _SCENES[k]) for k in keys}


def coco_sets(cfg: Any, paths: Mapping[str, str], pre: Any, *, train: bool = True
              ) -> tuple[CocoDetection, Optional[CocoDetection]]:
    """Validation and (``train``) training ``CocoDetection`` sets of a dense task's config:
    evaluation through ``pre`` (its ``Preprocess``), training with the box-aware augmentation;
    semantic masks come along when ``paths`` names mask folders (multi-task data). ``paths``
    names COCO files, or ``{"voc_root": DIR}`` for Pascal VOC (``data.voc_train`` / ``voc_val``)."""
    d = cfg.data
    train_tf = dense_train_transforms(cfg, boxes=True) or detection_train_transforms(
        d.image_size, (d.scale_min, d.scale_max), 0.5 if d.hflip else 0.0, seed=cfg.train.seed)
    if "voc_root" in paths:
        classes = getattr(d, "classes", None)
        val_set = voc_detection(paths["voc_root"], d.voc_val, pre.albumentations(boxes=True), skip_bad=d.skip_bad,
                                classes=classes,
                                limit=d.limit_val, evaluation=True, seed=cfg.train.seed)
        train_set = voc_detection(paths["voc_root"], d.voc_train, train_tf, skip_bad=d.skip_bad, classes=classes,
                                  limit=d.limit_train, seed=cfg.train.seed) if train else None
        return val_set, train_set
    val_set = CocoDetection(paths["val_ann"], paths["val_images"], pre.albumentations(boxes=True),
                            skip_bad=d.skip_bad, limit=d.limit_val, mask_dir=paths.get("val_masks"), evaluation=True,
                            seed=cfg.train.seed)
    if not train:
        return val_set, None
    train_set = CocoDetection(paths["train_ann"], paths["train_images"], train_tf,
                              skip_bad=d.skip_bad, limit=d.limit_train, mask_dir=paths.get("train_masks"),
                              seed=cfg.train.seed)
    if train_set.cat_ids != val_set.cat_ids:
        raise ValueError(f"{paths['train_ann']} and {paths['val_ann']} have different categories "
                         f"({train_set.cat_ids} vs {val_set.cat_ids})")
    return val_set, train_set


def unusable_samples(train_set: Optional[Any], val_set: Optional[Any]) -> Optional[dict[str, Iterable[str]]]:
    """``TaskData.skipped`` of file datasets under ``data.skip_bad``: each split's ``unusable``
    record (shared with the DataLoader workers), read when the run ends; None without skip_bad."""
    found = {split: ds.unusable for split, ds in (("train", train_set), ("val", val_set))
             if getattr(ds, "unusable", None) is not None}
    return found or None


def file_loaders(train_set: Optional[torch.utils.data.Dataset], val_set: torch.utils.data.Dataset, *,
                 cfg: Any, device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
                 train_collate: Callable, val_collate: Callable,
                 finish: Optional[Callable[[Any], Any]] = None) -> tuple[Optional[DeviceLoader], DeviceLoader]:
    """``(train, val)`` device loaders: batches of ``cfg.train.batch_size`` (shuffled, reseeded
    per epoch) and ``cfg.data.eval_batch_size``, images normalised on the device (channels_last
    when the config says so), then ``finish(batch)`` if given."""
    d = cfg.data
    on_device = normalize_images(normalize, cfg.train.channels_last)
    samplers: dict[str, Any] = {"train": None, "val": None}
    if d.resize == "aspect":  # batches of one aspect group and one scale each
        samplers["val"] = AspectBatchSampler(val_set.image_sizes(), d.eval_batch_size, scales=d.min_size[-1:],
                                             max_size=d.max_size, train=False)
        if train_set is not None:
            samplers["train"] = AspectBatchSampler(train_set.image_sizes(), cfg.train.batch_size, scales=d.min_size,
                                                   max_size=d.max_size, train=True, seed=cfg.train.seed)
    if finish is not None:
        normalized = on_device

        def on_device(batch):
            return finish(normalized(batch))

    def loader(ds, shuffle: bool, batch_size: int, collate: Callable):
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=d.num_workers,
                           collate_fn=collate, seed=cfg.train.seed, device=device,
                           batch_sampler=samplers["train" if shuffle else "val"])

    val = DeviceLoader(loader(val_set, False, d.eval_batch_size, val_collate), device, on_device)
    train = None
    if train_set is not None:
        train = DeviceLoader(loader(train_set, True, cfg.train.batch_size, train_collate), device, on_device,
                             seed=cfg.train.seed)
    return train, val


CACHE_MODES = ("auto", "device", "host", "none")


def cache_mode(cfg: Any, device: torch.device, n: int, *, masks: bool) -> str:
    """``data.cache`` resolved: device, host or none. auto is device on a GPU when the decoded
    set takes at most a quarter of its free memory (FashionScenes' 8000 scenes: 1.6 GB), else
    none; the aspect mode always reads through the DataLoader (its sizes vary)."""
    d = cfg.data
    if d.cache not in CACHE_MODES:
        raise ValueError(f"data.cache={d.cache!r}: choose one of {', '.join(CACHE_MODES)}")
    if d.resize == "aspect":
        if d.cache in ("device", "host"):
            raise ValueError(f"data.cache={d.cache} needs data.resize=square (the aspect mode's image sizes vary)")
        return "none"
    if d.cache != "auto":
        return d.cache
    if device.type != "cuda":
        return "none"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if cache_nbytes(n, d.image_size, masks=masks) <= free // 4 else "none"


def cached_train_loader(train_set: Optional[Any], *, cfg: Any, device: torch.device, pre: Preprocess, targets: str,
                        augment: DenseAugment, quiet: bool = True) -> Optional[DenseTensorLoader]:
    """The training loader of ``data.cache`` device / host: ``train_set`` decoded once through the
    evaluation resize (``pre``), augmented on ``device`` by ``augment`` (the task's albumentations
    pipeline redone there); None when the cache is off or there is no training set (the caller
    keeps its DataLoader)."""
    if train_set is None:
        return None
    masks = targets == "masks"
    mode = cache_mode(cfg, device, len(train_set), masks=masks)
    if mode == "none":
        return None
    cache = decode_dense(train_set, pre.albumentations(boxes=not masks), cfg.data.image_size,
                         boxes=not masks, masks=masks, workers=max(cfg.data.num_workers, 1), quiet=quiet)
    if mode == "device":  # host: stays where it was decoded, each batch pinned and copied
        cache = cache.to(device)
    return DenseTensorLoader(cache, augment, batch_size=cfg.train.batch_size, device=device, targets=targets,
                             seed=cfg.train.seed, channels_last=cfg.train.channels_last)

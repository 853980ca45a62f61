"""Small synthetic datasets written by tests (nothing is downloaded or read from the system)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzip when the name ends in .gz)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def fake_fashion_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class is a bright bar at a class-specific row: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k: 4 + 2 * k, 4:24] = 230
    return images, labels


def write_fake_fashion_mnist(folder: Path, n_train: int = 256, n_test: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_fashion_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


# Flags that shrink a FashionScenes task run to seconds on a CPU: 24 / 8 scenes of 64 px.
TINY_SCENES = ["--set", "data.scenes_train=24", "--set", "data.scenes_val=8", "--set", "data.scenes_size=64",
               "--set", "data.image_size=64", "--set", "data.num_workers=0", "--set", "data.eval_batch_size=4"]


def tiny_scenes_args(root: Path) -> list[str]:
    """``TINY_SCENES`` plus a fake Fashion-MNIST and a scenes folder under ``root``."""
    fm = write_fake_fashion_mnist(root / "fm", n_train=64, n_test=32)
    return TINY_SCENES + ["--data-dir", str(fm), "--set", f"data.scenes_root={root / 'scenes'}"]


# Small models of every task (untrained), as a run would save them: tasks.load, export and the
# README examples read them. ``meta`` defaults to what the task's own data would give.
TINY_MODELS = {
    "classify": {"model": {"in_chans": 1, "stem": "cifar", "num_classes": 3}},
    "detect": {"model": {"fpn_channels": 32, "num_convs": 1}, "data": {"image_size": 64}},
    "segment": {"data": {"image_size": 64}},
    "multitask": {"model": {"fpn_channels": 32, "num_convs": 1}, "data": {"image_size": 64}},
}
CLASS_NAMES = ["shirt", "boot", "bag"]


def task_meta(task: str, cfg) -> dict:
    from tasks import TASKS

    spec = TASKS[task]
    names = ["background", *CLASS_NAMES] if task == "segment" else list(CLASS_NAMES)
    meta = {"class_names": names, **spec.make_preprocess(cfg).to_meta()}
    if task in ("detect", "multitask"):
        meta["category_ids"] = [1, 5, 9]
    return meta


def write_task_checkpoint(path: Path, task: str, meta: dict | None = None, seed: int = 0) -> Path:
    """A checkpoint of ``task`` with ``TINY_MODELS`` settings and random weights."""
    import torch

    from tasks import TASKS
    from tasks.engine.checkpoint import CKPT_FORMAT, atomic_save
    from tasks.engine.config import config_from_dict, config_to_dict

    spec = TASKS[task]
    cfg = config_from_dict(spec.config, TINY_MODELS[task])
    meta = meta if meta is not None else task_meta(task, cfg)
    torch.manual_seed(seed)
    model = spec.build_model(cfg, {"class_names": meta.get("class_names") or meta["classes"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": CKPT_FORMAT, "task": task, "config": config_to_dict(cfg), "model": model.state_dict(),
                 "ema": None, "epoch": 1, "metrics": {}, "meta": meta}, path)
    return path


def in_child(fn) -> int:
    """Run ``fn`` in a forked child: its exit status, or minus the signal that killed it (a
    segfault in a C library must fail the test, not end the whole test session)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"child: {type(e).__name__}: {e}\n".encode("utf-8", "backslashreplace"))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

"""Pixels and datasets: image / mask reading, the one ``Preprocess``, Fashion-MNIST, FashionScenes,
COCO, image and mask folders, augmentation. Imports neither ``heads`` nor ``tasks.engine``."""
import os
import sys

# albumentations asks PyPI for a newer version on every import (a network call with a 2 s
# timeout and a warning on machines without internet); nothing here reaches the network
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Every fork (DataLoader workers, the FashionScenes pool, a user's own DataLoader over our datasets)
# happens with OpenCV at one thread. A child forked while cv2's thread pool is up (any threaded cv2
# call in the parent before: a resize of a large image, albumentations) hangs for good in its first
# cv2.setNumThreads (seed_worker's; OpenCV's pthreads pool); setting one thread in the parent first
# joins the pool. Measured: 5 of 6 plain DataLoader forks after two 2000x2000 resizes hung (the
# DataLoader's 20 s timeout), 0 of 6 with this hook. The parent gets its threads back.
_cv2_threads: list[int | None] = []  # per fork in progress: the parent's cv2 threads (None: no cv2)


def _cv2_before_fork() -> None:
    cv2 = sys.modules.get("cv2")  # only once something imported it: no import here
    _cv2_threads.append(cv2.getNumThreads() if cv2 is not None else None)
    if cv2 is not None:
        cv2.setNumThreads(1)


def _cv2_after_fork_in_parent() -> None:
    threads = _cv2_threads.pop()  # pushed by _cv2_before_fork of this fork
    if threads is not None:
        sys.modules["cv2"].setNumThreads(threads)


os.register_at_fork(before=_cv2_before_fork, after_in_parent=_cv2_after_fork_in_parent)

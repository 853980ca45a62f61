"""Pixels and datasets: image / mask reading, the one ``Preprocess``, Fashion-MNIST, FashionScenes,
COCO, image and mask folders, augmentation. Imports neither ``heads`` nor ``tasks.engine``."""
import os

# albumentations asks PyPI for a newer version on every import (a network call with a 2 s
# timeout and a warning on machines without internet); nothing here reaches the network
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

"""Datasets, loaders and augmentation: Fashion-MNIST, FashionScenes, COCO, image folders."""
import os

# albumentations asks PyPI for a newer version on every import (a network call with a 2 s
# timeout and a warning on machines without internet); nothing here reaches the network
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

"""Datasets, loaders and augmentation: Fashion-MNIST, FashionScenes, COCO, image folders."""

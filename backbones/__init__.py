"""Trunks returning multi-scale features: ``build_backbone("resnet50")["c5"]``."""
from .base import Backbone, FeatureSpec, build_backbone, list_backbones, register_backbone
from .fuse import fuse_conv_bn
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .weights import (LoadReport, UnsafeCheckpointError, WeightsMismatchError, load_backbone_weights,
                      read_checkpoint)

__all__ = [
    "Backbone", "FeatureSpec", "build_backbone", "list_backbones", "register_backbone",
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "LoadReport", "UnsafeCheckpointError", "WeightsMismatchError", "load_backbone_weights", "read_checkpoint",
    "fuse_conv_bn",
]

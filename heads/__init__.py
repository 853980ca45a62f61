"""Necks and task heads on a backbone's ``feature_info``."""
from .base import TaskModel
from .classification import ClassificationHead, Classifier, MultiLabelHead
from .detection import Detector, FCOSHead
from .fpn import FPN, BackboneWithFPN
from .multitask import MultiTaskModel
from .segmentation import FCNHead, Segmenter

__all__ = ["TaskModel", "ClassificationHead", "Classifier", "MultiLabelHead", "FPN", "BackboneWithFPN", "FCOSHead",
           "Detector", "FCNHead", "Segmenter", "MultiTaskModel"]

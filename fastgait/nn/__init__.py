"""Modules of fastgait. The ones that wrap a fused op take ``impl=`` (see ``fastgait.ops``).

``GeMHPP``, ``SeparateFCs``, ``TripletLoss`` and ``GLConv`` take the constructor arguments of
OpenGait's modules of the same name, so a model built there can swap one in.
``fastgait.nn.opengait`` holds the classes with OpenGait's exact contracts (losses included).
"""
from .conv import C3, BasicConv3d
from .gaitgl import GLConv
from .heads import BNClassifier, SeparateBNNecks, SeparateFCs
from .losses import CrossEntropyLoss, TripletLoss
from .masks import ComplementaryBandMasks
from .mla import MLA
from .pooling import GeMHPP, HorizontalPoolingPyramid, TemporalMax
from .regularizers import DropBlock, RandomErasing, ScalingDropBlock
from .reverse_mask import RMFE, InceptionRMB, PlainRMB, ReverseMask

__all__ = [
    "BasicConv3d", "C3", "ComplementaryBandMasks", "MLA", "ReverseMask", "RMFE", "PlainRMB", "InceptionRMB",
    "GLConv", "TemporalMax", "GeMHPP", "SeparateFCs", "BNClassifier", "SeparateBNNecks", "HorizontalPoolingPyramid", "TripletLoss", "CrossEntropyLoss",
    "DropBlock", "ScalingDropBlock", "RandomErasing",
]

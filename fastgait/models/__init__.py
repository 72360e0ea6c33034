"""The models, built from presets or configs: ``GaitMask``, ``ReverseMaskNet``, ``GaitGL`` (3-D),
``GaitSet`` and ``GaitBase`` (2-D set models, optionally with the 2-D Inception RMB).

Each maps silhouettes ``[n, t, h, w]`` to embeddings ``[n, c, parts]`` (and logits when the CE
head is on: ``num_classes > 0``).
"""
from __future__ import annotations

from typing import Any

import torch

from .gaitbase import GaitBase
from .gaitgl import GaitGL
from .gaitmask import GaitMask
from .network import GaitNet
from .gaitset import GaitSet
from .reverse_mask import ReverseMaskNet
from .opengait import from_opengait, to_opengait

MODELS = {"GaitMask": GaitMask, "ReverseMaskNet": ReverseMaskNet, "GaitGL": GaitGL, "GaitNet": GaitNet,
          "GaitSet": GaitSet, "GaitBase": GaitBase}


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """Build a model from a config dict: ``{"name": "GaitMask", "preset": "casia-b", ...}``;
    every other key is a constructor argument of that model class."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**config)


__all__ = ["GaitMask", "ReverseMaskNet", "GaitGL", "GaitNet", "GaitSet", "GaitBase", "build_model", "MODELS",
           "from_opengait", "to_opengait"]

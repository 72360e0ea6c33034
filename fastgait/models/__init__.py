"""The three models, built from presets or configs: ``GaitMask``, ``ReverseMaskNet``, ``GaitGL``.

Each maps silhouettes ``[n, t, h, w]`` to embeddings ``[n, c, parts]`` (and logits when the CE
head is on: ``num_classes > 0``).
"""
from __future__ import annotations

from typing import Any

from .gaitgl import GaitGL
from .gaitmask import GaitMask
from .network import GaitNet
from .reverse_mask import ReverseMaskNet

MODELS = {"GaitMask": GaitMask, "ReverseMaskNet": ReverseMaskNet, "GaitGL": GaitGL, "GaitNet": GaitNet}


def build_model(config: dict[str, Any]) -> GaitNet:
    """Build a model from a config dict: ``{"name": "GaitMask", "preset": "casia-b", ...}``;
    every other key is a constructor argument of that model class."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**config)


__all__ = ["GaitMask", "ReverseMaskNet", "GaitGL", "GaitNet", "build_model", "MODELS"]

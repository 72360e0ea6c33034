"""OpenGait checkpoint interop: ``from_opengait`` (OpenGait weights into a fastgait model) and
``to_opengait`` (a fastgait model's weights as OpenGait's state dict).

Supported: GaitGL (CASIA-B and OU-MVLP layouts, with the original BN head or SeparateBNNecks),
GaitSet, GaitBase (OpenGait's ``Baseline`` with the ResNet9 backbone). GaitSet and GaitBase use
OpenGait's module names, so their keys are the same; GaitGL's are mapped:

| fastgait (``GaitGL``) | OpenGait (``GaitGL``) |
|---|---|
| ``stem.{i}.conv.weight`` (all but the last) | ``conv3d.{2i}.conv3d.weight`` |
| ``stem.{last}.conv.weight`` | ``LTA.0.conv3d.weight`` |
| GL blocks before the max pool / the first / second half after it | ``GLConvA0`` / ``GLConvA1`` / ``GLConvB2`` (``.{j}`` when a stage holds several) |
| ``pool.p``, ``fcs.fc_bin`` | ``HPP.p``, ``Head0.fc_bin`` |
| ``head.bn.*``, ``head.classifier.fc_bin`` | ``Bn.*``, ``Head1.fc_bin`` |
| ``head.*`` (``head="bnneck"``) | ``BNNecks.*`` |
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

IGNORED_PREFIXES = ("loss_aggregator.",)  # OpenGait's BaseModel also holds its losses (no weights)


def _gaitgl_mapping(model) -> dict[str, str]:
    from ..nn import GLConv

    mapping: dict[str, str] = {}
    stem = list(model.stem)
    for i, _ in enumerate(stem):
        target = "LTA.0" if i == len(stem) - 1 else f"conv3d.{2 * i}"
        mapping[f"stem.{i}.conv.weight"] = f"{target}.conv3d.weight"
    before, after, pooled = [], [], False
    for index, block in enumerate(model.blocks):
        if isinstance(block, nn.MaxPool3d):
            if pooled:
                raise ValueError("OpenGait's GaitGL has one max pool; this model has more")
            pooled = True
        elif isinstance(block, GLConv):
            (after if pooled else before).append(index)
        else:
            raise ValueError(f"block {index} is a {type(block).__name__}: OpenGait's GaitGL holds only GLConv "
                             "blocks and one max pool")
    group = len(before)
    if group == 0 or len(after) != 2 * group:
        raise ValueError(f"OpenGait's GaitGL has g GL blocks before the max pool and 2g after; this model has "
                         f"{len(before)} and {len(after)}")
    stages = [("GLConvA0", before), ("GLConvA1", after[:group]), ("GLConvB2", after[group:])]
    for name, indices in stages:
        for j, index in enumerate(indices):
            prefix = name if group == 1 else f"{name}.{j}"
            for conv in ("global_conv3d", "local_conv3d"):
                mapping[f"blocks.{index}.{conv}.conv3d.weight"] = f"{prefix}.{conv}.conv3d.weight"
    mapping["pool.p"] = "HPP.p"
    mapping["fcs.fc_bin"] = "Head0.fc_bin"
    for key in model.state_dict():
        if key.startswith("head."):
            rest = key[len("head."):]
            if model.head_type == "bn":
                mapping[key] = ("Head1." + rest[len("classifier."):] if rest.startswith("classifier.")
                                else "Bn." + rest[len("bn."):])
            else:
                mapping[key] = "BNNecks." + rest
    return mapping


def opengait_key_map(model: nn.Module) -> dict[str, str]:
    """``{fastgait state-dict key: OpenGait state-dict key}`` for every entry of ``model.state_dict()``."""
    from .gaitbase import GaitBase
    from .gaitgl import GaitGL
    from .gaitset import GaitSet

    if isinstance(model, (GaitSet, GaitBase)):
        if any(".global_conv." in k or ".dropping." in k for k in model.state_dict()):
            raise ValueError("a model with the Inception RMB plug-in has no OpenGait counterpart")
        return {key: key for key in model.state_dict()}
    if isinstance(model, GaitGL):
        mapping = _gaitgl_mapping(model)
        missing = [k for k in model.state_dict() if k not in mapping]
        if missing:
            raise ValueError(f"no OpenGait key for {missing[0]!r}")
        return mapping
    raise ValueError(f"{type(model).__name__} has no OpenGait counterpart; supported: GaitGL, GaitSet, GaitBase")


def _state_dict_of(checkpoint: Union[str, Path, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"OpenGait checkpoint {path} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"an OpenGait checkpoint is a state dict or a dict with 'model'; got {type(checkpoint).__name__}")
    state = checkpoint["model"] if "model" in checkpoint and isinstance(checkpoint["model"], Mapping) else checkpoint
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    return out


def is_opengait_checkpoint(state: Mapping[str, Any]) -> bool:
    """True for OpenGait's ``{model, optimizer, scheduler, iteration}`` file (or a bare state dict),
    False for a fastgait checkpoint (which carries its ``config``)."""
    return "config" not in state and ("model" in state or all(isinstance(v, torch.Tensor) for v in state.values()))


def _complete_config(model_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fill what the checkpoint decides: ``num_classes`` ('auto' or unset) and GaitGL's head type."""
    config = dict(model_config)
    name = config.get("name")
    if name == "GaitGL":
        if "BNNecks.fc_bin" in state and "head" not in config:
            config["head"] = "bnneck"
            if "BNNecks.bn1d.0.weight" in state:
                config["bnneck"] = {**config.get("bnneck", {}), "parallel_BN1d": False}
        classifier = state.get("Head1.fc_bin", state.get("BNNecks.fc_bin"))
        if config.get("num_classes") in (None, "auto"):
            config["num_classes"] = int(classifier.shape[-1]) if classifier is not None else 0
    elif name == "GaitBase" and config.get("num_classes") in (None, "auto") and "BNNecks.fc_bin" in state:
        config["num_classes"] = int(state["BNNecks.fc_bin"].shape[-1])
    if config.get("num_classes") == "auto":
        config.pop("num_classes")
    return config


def load_opengait_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy OpenGait's ``state`` into ``model`` (strict); the first key that does not fit is named."""
    mapping = opengait_key_map(model)
    own = model.state_dict()
    translated = {}
    for ours, theirs in mapping.items():
        if theirs not in state:
            raise ValueError(f"OpenGait checkpoint has no {theirs!r} (for {type(model).__name__}'s {ours!r}); "
                             "check the model config (preset, head, channels) against the checkpoint's model")
        value = state[theirs]
        if tuple(value.shape) != tuple(own[ours].shape):
            raise ValueError(f"OpenGait's {theirs!r} has shape {tuple(value.shape)} but {type(model).__name__}'s "
                             f"{ours!r} needs {tuple(own[ours].shape)}; check the model config (preset, channels, "
                             "num_classes)")
        translated[ours] = value
    unexpected = sorted(set(state) - set(mapping.values()))
    if unexpected:
        raise ValueError(f"OpenGait checkpoint key {unexpected[0]!r} has no place in {type(model).__name__} "
                         f"({len(unexpected)} unused key(s)); check the model config against the checkpoint's model")
    model.load_state_dict(translated, strict=True)
    return model


def from_opengait(checkpoint: Union[str, Path, Mapping[str, Any]], model_config: Mapping[str, Any]) -> nn.Module:
    """A fastgait model with an OpenGait checkpoint's weights.

    ``checkpoint``: a path to OpenGait's ``.pt`` (``{model, optimizer, scheduler, iteration}``), that
    dict, or OpenGait's state dict. ``model_config``: a model section as in ``configs/``
    (``{"name": "GaitGL", "preset": "casia-b", ...}``); ``num_classes: auto`` (or unset) takes the
    checkpoint's classifier size, and a GaitGL checkpoint with SeparateBNNecks selects
    ``head="bnneck"``. Loading is strict: a missing, unused or wrongly shaped key is an error that names it.
    """
    from . import build_model

    state = _state_dict_of(checkpoint)
    model = build_model(_complete_config(model_config, state))
    return load_opengait_state_dict(model, state)


def to_opengait(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """``model``'s weights under OpenGait's keys (save as ``{"model": to_opengait(model)}`` for
    OpenGait's ``restore_hint``; OpenGait's optimizer state is not produced)."""
    mapping = opengait_key_map(model)
    return OrderedDict((mapping[key], value.detach().clone()) for key, value in model.state_dict().items())

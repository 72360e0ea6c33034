"""Training configs: YAML recipes (``configs/``) merged over defaults, with ``key.sub=value`` overrides.

A config has four sections — ``data``, ``model``, ``loss``, ``train`` (plus ``eval``) — whose
keys are listed in ``DEFAULTS``. Unknown keys are errors (a typo should not silently train the
wrong model), except under ``model``, whose keys are the model class's constructor arguments.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "data": {
        "root": None,  # processed dataset (OpenGait layout); None: the synthetic dataset below
        "partition": None,  # partition JSON; None: ROOT/partition.json (or the split preset below)
        "split": None,  # CASIA-B split preset st | mt | lt (first 24 / 62 / 74 subjects train)
        "synthetic": {"preset": "small", "seed": 0},
        "protocol": "casia-b",
        "cache": True,
        "workers": 2,
        "on_error": "raise",  # or "skip": skip unreadable sequence files and count them
    },
    "model": {"name": "GaitMask", "preset": "casia-b"},
    "loss": {
        "margin": 0.2,
        "ce_weight": 0.0,  # weight of the part-wise CE loss (needs model.num_classes > 0)
        "ce_scale": 1.0,
        "ce_label_smooth": 0.0,
    },
    "train": {
        "P": 8,
        "K": 16,
        "clip_len": 30,
        "iterations": 80000,
        "optimizer": "adam",
        "lr": 1.0e-4,
        "weight_decay": 0.0,
        "milestones": [70000],  # MultiStepLR
        "gamma": 0.1,
        "amp": "auto",  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
        "compile": "auto",  # auto (on for GPU) | true | false
        "channels_last": "auto",  # channels-last-3d activations on GPU
        "seed": 0,
        "log_every": 100,
        "checkpoint_every": 5000,
        "eval_every": 0,  # 0: evaluate once at the end
        "grad_clip": 0.0,  # 0: off
        "sync_bn": False,  # SyncBatchNorm under DDP (OpenGait's sync_BN); one process: no effect
    },
    "eval": {"metric": "euc", "workers": 2, "baseline": True,
             "amp": "fp32"},  # evaluation precision: fp32 (OpenGait's default) | bf16 | fp16 | auto
}

OPEN_SECTIONS = ("model",)


def config_dir() -> Path:
    """The folder of the YAML recipes: ``configs/`` in a checkout, ``fastgait.configs`` when installed."""
    import fastgait.configs

    return Path(fastgait.configs.__file__).resolve().parent


def available_configs() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = config_dir() / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(
        f"no config {name_or_path!r}: not a YAML file, and not one of the recipes in {config_dir()}: "
        f"{', '.join(available_configs())}"
    )


def deep_merge(base: dict, update: dict, path: str = "") -> dict:
    """``base`` updated by ``update`` recursively; unknown keys raise, except in open sections."""
    merged = copy.deepcopy(base)
    open_section = path.split(".")[0] in OPEN_SECTIONS
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in merged and not open_section:
            hint = difflib.get_close_matches(key, list(merged), n=1)
            raise KeyError(f"unknown config key {where!r}" + (f"; did you mean '{path}{hint[0]}'?" if hint else ""))
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, f"{where}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict:
    """``"train.lr=1e-5"`` -> ``{"train": {"lr": 1e-5}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.iterations=1000)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(name_or_path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None) -> dict:
    """Defaults, then the YAML recipe (if any), then ``base`` (a dict), then the overrides."""
    config = copy.deepcopy(DEFAULTS)
    if name_or_path:
        path = resolve_config_path(name_or_path)
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping, got {type(recipe).__name__}")
        if "model" in recipe:  # a recipe names its whole model: do not inherit the default's keys
            config["model"] = {}
        config = deep_merge(config, recipe)
    if base:
        config = deep_merge(config, base)
    for text in overrides:
        config = deep_merge(config, parse_override(text))
    return config

"""Training configs: YAML recipes (``configs/``) merged over defaults, with ``key.sub=value`` overrides.

A config has four sections — ``data``, ``model``, ``loss``, ``train`` (plus ``eval``) — whose
keys are listed in ``DEFAULTS``. Unknown keys are errors (a typo should not silently train the
wrong model), except under ``model``, whose keys are the model class's constructor arguments.
"""
from __future__ import annotations

import copy
import difflib
import math
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
        "protocol": "casia-b",  # casia-b | oumvlp | grew | gait3d | real-scene
        "cache": True,
        "workers": 2,
        "on_error": "raise",  # or "skip": skip unreadable sequence files and count them
        "in_use": None,  # OpenGait's data_in_use: which file of a multi-file sequence folder, e.g. [true, false]
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
        "clip_len": 30,  # frames per training clip (OpenGait's frames_num_fixed)
        "sample_type": "fixed_ordered",  # fixed_ordered | fixed_unordered | unfixed_ordered | unfixed_unordered
        "frames_num_min": 25,  # unfixed samplers: clip length drawn per batch from min..max
        "frames_num_max": 35,
        "frames_skip_num": 0,  # ordered samplers: window of clip_len + skip frames, clip_len kept in order
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
    "eval": {
        "metric": "euc",
        "workers": 2,
        "baseline": True,
        "frames_all_limit": -1,  # test: only the first N frames of a sequence (-1: all)
        "probe": None,  # gait3d: probe keys JSON / list (default: the partition's PROBE_SET); real-scene: probe types
        "rerank": False,  # k-reciprocal re-ranking (real-scene protocols)
        "cross_view_gallery": False,  # casia-b / oumvlp: OpenGait's cross-view-gallery evaluation
        "amp": "fp32",  # evaluation precision: fp32 (OpenGait's default) | bf16 | fp16 | auto
        "submission": None,  # grew | hid: python -m fastgait.evaluate also writes the challenge CSV to its report folder
    },
}

OPEN_SECTIONS = ("model",)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the fix."""


class ConfigKeyError(ConfigError, KeyError):
    """An unknown config key (a ``KeyError`` too, for callers that catch that)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


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
            known = ", ".join(sorted(merged))
            raise ConfigKeyError(f"unknown config key {where!r}" + (f"; did you mean '{path}{hint[0]}'?" if hint else
                                                                   f" (known keys{' of ' + path.rstrip('.') if path else ''}: {known})"))
        if isinstance(merged.get(key), dict) and not open_section and not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a mapping of its keys ({', '.join(merged[key])}), "
                              f"got {value!r}; e.g. {where}.{next(iter(merged[key]), 'key')}=...")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, f"{where}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict:
    """``"train.lr=1e-5"`` -> ``{"train": {"lr": 1e-5}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.iterations=1000)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value does not parse as YAML ({_one_line(error)}); "
                          "quote it or fix the syntax") from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: the key {key!r} must look like section.key (e.g. train.lr=1e-4)")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(name_or_path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None) -> dict:
    """Defaults, then the YAML recipe (if any), then ``base`` (a dict), then the overrides."""
    config = copy.deepcopy(DEFAULTS)
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            with open(path, encoding="utf-8") as f:
                recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:  # includes !!python/... tags, which safe_load refuses
            raise ConfigError(f"{path}: not a valid fastgait YAML config ({_one_line(error)}); "
                              "fix the file (plain YAML mappings only, no !!python tags)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read the config ({error})") from None
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping (section: {{key: value}}), "
                              f"got {type(recipe).__name__}")
        if "model" in recipe:  # a recipe names its whole model: do not inherit the default's keys
            config["model"] = {}
        config = deep_merge(config, recipe)
    if base:
        if not isinstance(base, dict):
            raise ConfigError(f"a base config must be a mapping, got {type(base).__name__}")
        if isinstance(base.get("model"), dict):  # like a recipe, a base names its whole model
            config["model"] = {}
        config = deep_merge(config, base)
    for text in overrides:
        config = deep_merge(config, parse_override(text))
    return validate_config(config)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --- typed validation ------------------------------------------------------------------------


def _int(minimum: Optional[int] = None):
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            number = float(value)
            ok = number == int(number)
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        number = int(number)
        if minimum is not None and number < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value!r}")
        return number

    return check


def _float(minimum: Optional[float] = None, positive: bool = False, below: Optional[float] = None):
    def check(key: str, value: Any) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if positive and number <= 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
        if minimum is not None and number < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value!r}")
        if below is not None and number >= below:
            raise ConfigError(f"{key} must be < {below}, got {value!r}")
        return number

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _auto_bool(key: str, value: Any):
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be auto, true or false, got {value!r}")


def _choice(*choices):
    def check(key: str, value: Any):
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(str(c) for c in choices)}, got {value!r}")
        return value

    return check


def _optional_str(key: str, value: Any):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key} must be a path (a string) or null, got {value!r}")


def _str(key: str, value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise ConfigError(f"{key} must be a non-empty string, got {value!r}")


def _split(key: str, value: Any):
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("st", "mt", "lt"):
        return value
    raise ConfigError(f"{key} must be st, mt, lt or null, got {value!r}")


def _milestones(key: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list of iterations, got {value!r}; e.g. {key}=[{value if isinstance(value, int) else 70000}]")
    return [_int(0)(f"{key}[{i}]", v) for i, v in enumerate(value)]


def _gamma(key: str, value: Any):
    if isinstance(value, (list, tuple)):
        return [_float(positive=True)(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return _float(positive=True)(key, value)


SCHEMA: dict[str, Any] = {
    "name": _str,
    "data.root": _optional_str,
    "data.partition": _optional_str,
    "data.split": _split,
    "data.synthetic.preset": _str,
    "data.synthetic.seed": _int(0),
    "data.protocol": _choice("casia-b", "oumvlp", "grew", "gait3d", "real-scene", "auto"),
    "data.cache": _bool,
    "data.workers": _int(0),
    "data.on_error": _choice("raise", "skip"),
    "loss.margin": _float(minimum=0.0),
    "loss.ce_weight": _float(minimum=0.0),
    "loss.ce_scale": _float(positive=True),
    "loss.ce_label_smooth": _float(minimum=0.0, below=1.0),
    "train.P": _int(2),
    "train.K": _int(1),
    "train.clip_len": _int(1),
    "train.iterations": _int(1),
    "train.optimizer": _choice("adam", "sgd"),
    "train.lr": _float(positive=True),
    "train.weight_decay": _float(minimum=0.0),
    "train.milestones": _milestones,
    "train.gamma": _gamma,
    "train.amp": _choice("auto", "bf16", "fp16", "fp32"),
    "train.compile": _auto_bool,
    "train.channels_last": _auto_bool,
    "train.seed": _int(0),
    "train.log_every": _int(1),
    "train.checkpoint_every": _int(0),
    "train.eval_every": _int(0),
    "train.grad_clip": _float(minimum=0.0),
    "eval.metric": _choice("euc", "cos"),
    "eval.workers": _int(0),
    "eval.baseline": _bool,
}

HINTS = {
    "train.P": "identities per batch (>= 2: a triplet needs a negative)",
    "train.iterations": "the number of training steps (>= 1)",
    "train.log_every": "log every N iterations (>= 1)",
}


def validate_config(config: dict) -> dict:
    """Check every known key's type and range (a :class:`ConfigError` naming the key and the fix);
    numbers given as strings (YAML 1.1 reads ``1e-4`` as one) become numbers. Keys without a
    rule pass unchanged. Returns the config (updated in place)."""
    for section in ("data", "model", "loss", "train", "eval"):
        if not isinstance(config.get(section), dict):
            example = {"data": "data.root=/data/CASIA-B-pkl", "model": "model.name=GaitMask",
                       "loss": "loss.margin=0.2", "train": "train.lr=1e-4", "eval": "eval.metric=euc"}[section]
            raise ConfigError(f"config section {section!r} must be a mapping of keys, got {config.get(section)!r}; "
                              f"set its keys one by one, e.g. {example}")
    if not isinstance(config["data"].get("synthetic"), dict):
        raise ConfigError(f"data.synthetic must be a mapping {{preset: ..., seed: ...}}, got {config['data'].get('synthetic')!r}")
    if "name" in config["model"] and not isinstance(config["model"]["name"], str):
        raise ConfigError(f"model.name must be a model name (GaitMask, ReverseMaskNet, GaitGL), got {config['model']['name']!r}")
    for dotted, check in SCHEMA.items():
        *parents, leaf = dotted.split(".")
        cursor = config
        for part in parents:
            cursor = cursor.get(part) if isinstance(cursor, dict) else None
        if not isinstance(cursor, dict) or leaf not in cursor:
            continue
        try:
            cursor[leaf] = check(dotted, cursor[leaf])
        except ConfigError as error:
            hint = HINTS.get(dotted)
            raise ConfigError(f"{error}" + (f" ({dotted}: {hint})" if hint else "")) from None
    train = config["train"]
    if train.get("K") == 1 and not config["loss"].get("ce_weight"):
        raise ConfigError("train.K=1 gives each identity one sequence per batch, so the triplet loss has no positive "
                          "pair and learns nothing; set train.K=2 or more (or train with the CE loss: "
                          "loss.ce_weight=1 model.num_classes=auto)")
    gamma = train.get("gamma")
    if isinstance(gamma, list) and len(gamma) != len(train.get("milestones", [])):
        raise ConfigError(f"train.gamma has {len(gamma)} values for {len(train['milestones'])} train.milestones; "
                          "give one gamma, or one per milestone")
    return config

"""The training loop: P x K triplet training with AMP, torch.compile, DDP, checkpoints and evaluation."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .. import data as gait_data
from .._cli import InputError
from .._nvtx import nvtx_range
from ..config import ConfigError, validate_config
from ..models import build_model
from ..nn import CrossEntropyLoss, TripletLoss
from ..ops.masks import set_batch_shard
from . import checkpoint as ckpt
from . import distributed
from .evaluation import eval_options, evaluate_model, report_results
from .signals import protect_workers

KEEP_CHECKPOINTS = 3
_NEVER = 2**62  # "no non-finite step yet" (a MIN all-reduce keeps the earliest bad step)


class NonFiniteLossError(RuntimeError):
    """The run diverged (NaN/inf loss, embeddings, distances or gradients); training stopped
    without writing anything from that state."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the trainer saved a checkpoint at a step boundary and stopped."""


# Keys a --resume may change (schedule, cadence, performance switches, evaluation); any other
# difference from the checkpoint's config is refused, naming the key.
RESUMABLE_KEYS = (
    "name", "train.iterations", "train.lr", "train.milestones", "train.gamma", "train.weight_decay",
    "train.grad_clip", "train.log_every", "train.checkpoint_every", "train.eval_every", "train.compile",
    "train.channels_last", "data.workers", "data.cache", "data.on_error", "data.root", "data.partition",
    "data.protocol", "eval.",
)
RUN_FILES = ("metrics.jsonl", "checkpoints", "eval", "tensorboard")


def resolve_device(requested: Optional[str] = None) -> torch.device:
    """The device to train on: ``requested`` (checked: it must exist here), else this rank's GPU, else the CPU."""
    if not requested:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {requested!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {requested}: CUDA is not available on this machine (no GPU, or a CPU-only "
                             "torch build); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise InputError(f"--device {requested}: fastgait trains on cpu or cuda (got {device.type})")
    return device


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and not (prefix == "" and key == "model"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_differences(old: dict, new: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """``(changeable, fixed)``: the keys whose value differs between a checkpoint's config and
    ``new``, split into those a resume applies and those it must refuse."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    old_model, new_model = old_flat.pop("model", {}) or {}, new_flat.pop("model", {}) or {}
    changeable, fixed = [], []
    for key in sorted(set(old_model) | set(new_model)):
        if old_model.get(key) != new_model.get(key):
            fixed.append((f"model.{key}", old_model.get(key), new_model.get(key)))
    for key in sorted(set(old_flat) & set(new_flat)):
        if old_flat[key] == new_flat[key]:
            continue
        allowed = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)
        (changeable if allowed else fixed).append((key, old_flat[key], new_flat[key]))
    return changeable, fixed


def check_resume_config(old: dict, new: dict, checkpoint: Path) -> list[tuple[str, Any, Any]]:
    """The changes a resume applies; a :class:`ConfigError` naming every key it cannot change."""
    changeable, fixed = resume_differences(old, new)
    if fixed:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in fixed)
        raise ConfigError(
            f"--resume cannot change {', '.join(k for k, _, _ in fixed)} ({listed}): {checkpoint} was trained with "
            f"the checkpoint's values. Drop those overrides, or start a new run in another folder (--output). "
            f"A resume may change: {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE_KEYS)}")
    return changeable


def existing_run_files(output: Path) -> list[str]:
    """What a previous run left in ``output`` (metrics, checkpoints, reports), as short descriptions."""
    output = Path(output)
    found = []
    if (output / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    checkpoints = ckpt.list_checkpoints(output / "checkpoints") if (output / "checkpoints").is_dir() else []
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) up to iteration {checkpoints[-1][0]}")
    for folder in ("eval", "tensorboard"):
        if (output / folder).is_dir() and any((output / folder).iterdir()):
            found.append(f"{folder}/")
    return found


def check_run_folder(output: Path, resume: Optional[Path], overwrite: bool) -> None:
    """A fresh run (no ``resume``) refuses a folder holding another run, unless ``overwrite``."""
    if resume is not None or overwrite:
        return
    found = existing_run_files(output)
    if found:
        raise InputError(f"{output} already holds a run ({', '.join(found)}); continue it with --resume, "
                         "write this run elsewhere (--output DIR), or replace it with --overwrite")


def check_writable(folder: Path) -> None:
    """``folder`` exists (created if needed) and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fastgait-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise InputError(f"cannot write to the run folder {folder} ({error.strerror or error}); "
                         "choose another --output") from None


def resolve_amp(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32."""
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if setting not in choices:
        raise ValueError(f"train.amp must be auto, bf16, fp16 or fp32, got {setting!r}")
    return choices[setting]


def _auto_flag(value: Any, device: torch.device) -> bool:
    return device.type == "cuda" if value == "auto" else bool(value)


def _lr_factor(milestones: list[int], gamma) -> Any:
    """Piecewise-constant lr factor: multiplied by ``gamma`` (or ``gamma[i]``) at each milestone."""
    gammas = list(gamma) if isinstance(gamma, (list, tuple)) else [gamma] * len(milestones)
    if len(gammas) != len(milestones):
        raise ValueError(f"train.gamma has {len(gammas)} values for {len(milestones)} milestones")

    def factor(iteration: int) -> float:
        return math.prod(g for m, g in zip(milestones, gammas) if iteration >= m)

    return factor


class Trainer:
    """Builds data, model, optimiser and loss from a resolved config and trains.

    Only rank 0 writes (checkpoints, logs, reports). ``output`` is the run folder.
    """

    def __init__(self, config: dict, output: Path, *, device: Optional[str] = None, progress: bool = True,
                 check_eval: bool = True, overwrite: bool = False):
        self.config = validate_config(config)
        self.output = Path(output)
        self.overwrite = overwrite
        self.device = resolve_device(device)
        self.dist = distributed.setup(self.device.type)
        # A second, CPU (gloo) group for the per-step stop vote, so it never waits for the GPU.
        self._vote_group = None
        if self.dist.enabled and torch.distributed.get_backend() != "gloo":
            self._vote_group = torch.distributed.new_group(backend="gloo")
        self._existing_run = existing_run_files(self.output)  # before this trainer writes anything
        self.progress = progress and self.dist.is_main
        train_cfg = config["train"]
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = resolve_amp(train_cfg["amp"], self.device)
        # Every rank draws the same random numbers; per-sample draws are sliced by rank
        # (fastgait.ops.masks), so a DDP run equals one process with the global batch.
        torch.manual_seed(train_cfg["seed"])
        set_batch_shard(self.dist.rank, self.dist.world_size)

        self.data_root, self.partition = self._prepare_data()
        self.train_set = gait_data.GaitDataset(
            self.data_root, self.partition, "train", cache=config["data"]["cache"],
            on_error=config["data"]["on_error"], progress=self.progress, in_use=config["data"]["in_use"],
        )
        if train_cfg["P"] > self.train_set.num_ids:
            raise ConfigError(f"train.P={train_cfg['P']} identities per batch, but the training split has only "
                              f"{self.train_set.num_ids}; set train.P={self.train_set.num_ids} or less")
        model_cfg = dict(config["model"])
        if model_cfg.get("num_classes") == "auto":
            model_cfg["num_classes"] = self.train_set.num_ids
        self.model_config = model_cfg
        model = _build_model_checked(model_cfg).to(self.device)
        self.channels_last = _auto_flag(train_cfg["channels_last"], self.device)
        if self.channels_last:  # 2-D set models (GaitSet, GaitBase) hold 4-D weights
            model = model.to(memory_format=getattr(model, "channels_last_format", torch.channels_last_3d))
        self.model = model
        self.net = model
        if self.dist.enabled and train_cfg.get("sync_bn"):
            self.net = model = distributed.convert_sync_batchnorm(model, self.device)
            self.model = model
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if _auto_flag(train_cfg["compile"], self.device):
            self.net = torch.compile(self.net)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(list(train_cfg["milestones"]), train_cfg["gamma"]))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        loss_cfg = config["loss"]
        self.triplet = TripletLoss(loss_cfg["margin"])
        self.ce_weight = float(loss_cfg["ce_weight"])
        if self.ce_weight > 0 and not model_cfg.get("num_classes"):
            raise ValueError("loss.ce_weight > 0 needs a classifier head: set model.num_classes (or 'auto')")
        smoothing = float(loss_cfg["ce_label_smooth"])  # the smoothing amount (OpenGait: label_smooth + eps)
        self.ce = CrossEntropyLoss(loss_cfg["ce_scale"], label_smooth=smoothing > 0, eps=smoothing, log_accuracy=True)
        self.eval_amp = resolve_amp(config["eval"].get("amp", "fp32"), self.device)
        self.iteration = 0
        self._baseline: Optional[dict] = None  # the GEI baseline's result, computed once
        self._test_set = None
        if train_cfg["K"] < 2:
            self._say("warning: train.K=1: no identity has a second sequence in a batch, so the triplet loss has no "
                      "positive pair and is 0; only the CE loss (loss.ce_weight) trains")
        self._on_rank0_for_all(lambda: self._preflight(check_eval))

    def _on_rank0_for_all(self, check) -> None:
        """Run ``check`` on rank 0; every rank raises if it failed (no rank trains on alone)."""
        error = None
        if self.dist.is_main:
            try:
                check()
            except Exception as caught:  # noqa: BLE001 - re-raised below, after the vote
                error = caught
        if self.dist.enabled:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._vote_group)
            if flag.item() and error is None:
                raise InputError("rank 0 found a problem before training (its error line says which)")
        if error is not None:
            raise error

    def _preflight(self, check_eval: bool) -> None:
        """Everything the run needs after training, checked (on rank 0) before the first
        iteration: the run folder is writable, and (when the run evaluates) the test split reads
        and has a gallery and probes under the protocol."""
        check_writable(self.output)
        if not check_eval:
            return
        data_cfg = self.config["data"]
        on_error = data_cfg["on_error"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # on_error="skip" reads every file now, recording the unreadable ones instead of raising.
            test_set = gait_data.GaitDataset(self.data_root, self.partition, "test", cache=False,
                                             on_error="skip", progress=False, in_use=data_cfg["in_use"])
        if test_set.num_skipped and on_error == "raise":
            path, problem = test_set.skipped[0]
            more = f" (and {test_set.num_skipped - 1} more)" if test_set.num_skipped > 1 else ""
            raise InputError(f"test split: cannot read {path}: {problem}{more}; fix or remove the file, or set "
                             "data.on_error=skip to leave unreadable files out")
        if test_set.num_skipped:
            self._say(f"warning: test split: {test_set.num_skipped} unreadable sequence files left out "
                      f"(data.on_error=skip), e.g. {test_set.skipped[0][0]}")
        _check_protocol(test_set, data_cfg["protocol"], eval_options(self.config)["probe"])
        self._test_set = test_set

    # --- setup ---------------------------------------------------------------------------

    def _prepare_data(self) -> tuple[Path, Optional[Path]]:
        """``data_paths`` of the config, after generating the synthetic set / split file (rank 0)."""
        data_cfg = self.config["data"]
        root, partition = data_paths(data_cfg)
        if self.dist.is_main:
            if not data_cfg["root"]:
                synthetic = data_cfg["synthetic"]
                ensure_synthetic(root, synthetic["preset"], synthetic["seed"], progress=self.progress)
        distributed.barrier(self.dist)
        return root, partition

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config["train"]
        if cfg["optimizer"] == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        if cfg["optimizer"] == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
        raise ValueError(f"train.optimizer must be adam or sgd, got {cfg['optimizer']!r}")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def eval_autocast(self):
        """Evaluation precision: ``eval.amp`` (fp32 by default, as OpenGait evaluates)."""
        if self.eval_amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.eval_amp)

    # --- checkpoints ---------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        rng = ckpt.rng_state()
        rngs = [rng]
        if self.dist.enabled:
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, rng)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "iteration": self.iteration,
            "world_size": self.dist.world_size,
            "config": self.config,
            "model_config": self.model_config,
        }

    def save_checkpoint(self) -> Optional[Path]:
        """Write a checkpoint of the current step (every rank calls it). Refuses (NonFiniteLossError)
        a diverged state: a checkpoint on disk always holds finite weights."""
        self._check_finite()
        if ckpt.nonfinite_tensors(self.model.state_dict()):  # every rank: same weights, same verdict
            self._raise_nonfinite(self.iteration, "the weights")
        state = self.state_dict()  # every rank takes part (RNG gather)
        if not self.dist.is_main:
            return None
        path = ckpt.save_atomic(state, ckpt.checkpoint_path(self.checkpoint_dir, self.iteration))
        ckpt.prune_checkpoints(self.checkpoint_dir, KEEP_CHECKPOINTS, protect=path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes; resume with the same number "
                             f"(now {self.dist.world_size}) to continue exactly")
        changes = check_resume_config(state["config"], self.config, Path(path))
        bad = ckpt.nonfinite_tensors(state["model"])
        if bad:
            raise ckpt.CheckpointError(f"{path} holds NaN/inf weights ({len(bad)} tensors, e.g. {bad[0]}); "
                                       "resume from an earlier checkpoint (--resume PATH)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            ckpt.set_rng_state(state["rng"][self.dist.rank])
            self.iteration = int(state["iteration"])
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as error:
            message = " ".join(str(error).split())[:300]
            raise ckpt.CheckpointError(f"{path} does not match this model or trainer ({message}); resume from a "
                                       "checkpoint of this run") from None
        self._apply_schedule()
        for key, old, new in changes:
            self._say(f"resume: {key} {old!r} -> {new!r}")

    def _apply_schedule(self) -> None:
        """Set lr and weight decay from the config at the current iteration (after loading an
        optimizer/scheduler state, so a resume with train.lr / milestones / gamma overrides
        trains with them; unchanged values give the same lr as before, bit for bit)."""
        cfg = self.config["train"]
        factor = _lr_factor(list(cfg["milestones"]), cfg["gamma"])
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [cfg["lr"]] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg["lr"]
            group["lr"] = cfg["lr"] * factor(self.scheduler.last_epoch)
            group["weight_decay"] = cfg["weight_decay"]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # --- training ------------------------------------------------------------------------

    def train_step(self, sils: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        sils = sils.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            sils = sils.unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
        with nvtx_range("forward"), self.autocast():
            out = self.net(sils)
        embeddings, logits = out if isinstance(out, tuple) else (out, None)
        with nvtx_range("loss"):
            all_embeddings, all_labels = distributed.gather_for_triplet(embeddings.float(), labels, self.dist)
            loss, info = self.triplet(all_embeddings, all_labels)
            loss = loss * self.dist.world_size
            global_ce = None
            if logits is not None and self.ce_weight > 0:
                ce_loss, ce_info = self.ce(logits, labels)
                loss = loss + self.ce_weight * ce_loss
                # the CE of the local batch; the global batch's is the mean over ranks (equal slices)
                global_ce = distributed.mean_over_ranks(
                    torch.stack([ce_info["loss"], ce_info["accuracy"]]), self.dist)
                info = {**info, "ce_loss": global_ce[0], "accuracy": global_ce[1]}
        self.optimizer.zero_grad(set_to_none=True)
        with nvtx_range("backward"):
            self.scaler.scale(loss).backward()
        grad_norm = None
        with nvtx_range("optimizer"):
            if self.config["train"]["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config["train"]["grad_clip"])
            elif not self.scaler.is_enabled():  # fp16: the scaler itself skips steps with inf/NaN gradients
                grad_norm = _grad_norm(self.model.parameters())
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self._nonfinite_code = nonfinite_code(loss, embeddings, info.get("mean_pos_dist"), grad_norm)
        # The logged total is the global objective: the triplet loss of the gathered batch plus the
        # weighted CE of the global batch (not the rank's scaled loss).
        total = info["loss"] + (self.ce_weight * global_ce[0] if global_ce is not None else 0.0)
        return {"total_loss": total.detach(), **info}

    def train(self, resume: Optional[Path] = None) -> dict[str, Any]:
        """Train to ``train.iterations``; returns the last logged metrics (and the evaluation, if run).

        A fresh run (no ``resume``) refuses a folder holding another run unless the trainer was
        built with ``overwrite=True``. Ctrl-C / SIGTERM stop at the next step boundary (every
        rank agrees on which), save a checkpoint and raise :class:`TrainingInterrupted`; a second
        Ctrl-C aborts at once without saving. A diverging run (NaN/inf loss, embeddings,
        distances or gradient norm) raises :class:`NonFiniteLossError` without saving that state.
        """
        cfg = self.config["train"]
        if resume is None:
            if self._existing_run and not self.overwrite:
                check_run_folder(self.output, None, False)
            if self._existing_run and self.overwrite and self.dist.is_main:
                self._clear_previous_run()
        if self.dist.is_main and self.checkpoint_dir.is_dir():
            for tmp in ckpt.remove_stale_temporaries(self.checkpoint_dir):
                self._say(f"removed {tmp.name} (left by a checkpoint write that was killed)")
        if resume:
            self.load_checkpoint(resume)
            self._say(f"resumed from {resume} at iteration {self.iteration}")
            if self.dist.is_main:
                self._set_aside_newer_checkpoints()
        distributed.barrier(self.dist)
        total = int(cfg["iterations"])
        if self.iteration >= total:
            self._say(f"the checkpoint is at iteration {self.iteration} and train.iterations={total}: nothing to "
                      f"train (raise train.iterations to continue)")
        logger = MetricsLogger(self.output, enabled=self.dist.is_main, resume_from=self.iteration)
        bar = _progress_bar(total, self.iteration, self.progress)
        self._first_bad = torch.full((), _NEVER, dtype=torch.long, device=self.device)
        self._bad_code = torch.zeros((), dtype=torch.long, device=self.device)
        last: dict[str, Any] = {}
        window_start, window_iters = time.perf_counter(), 0
        self.model.train()
        stop = _StopRequest(self.dist.is_main)
        try:
            # Signal handlers first: loader workers forked now inherit them (a Ctrl-C that reaches
            # the whole process group only sets a flag in a worker instead of killing it).
            stop.install()
            loader = gait_data.make_train_loader(
                self.train_set, cfg["P"], cfg["K"], frames=gait_data.FrameSampler.from_config(cfg),
                workers=self.config["data"]["workers"],
                rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg["seed"], start_iteration=self.iteration)
            # Loader workers ignore SIGINT/SIGTERM (torchrun and Slurm signal the whole process
            # group): the main process decides when to stop, and the workers end with it.
            protect_workers(loader)
            # Starting the loader draws a worker seed from torch's generator: keep that out of
            # the stream the model draws from, so a resumed run draws exactly what it would have.
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            while self.iteration < total:
                if self._agree_to_stop(stop.requested):
                    path = self.save_checkpoint()
                    if path:
                        self._say(f"{stop.reason} at iteration {self.iteration}: checkpoint saved to {path}; "
                                  f"continue with --resume {path}")
                    raise TrainingInterrupted(str(path))
                sils, labels = next(batches)
                with nvtx_range(f"step {self.iteration}"):
                    metrics = self.train_step(sils, labels)
                self._first_bad, self._bad_code = record_nonfinite(
                    self._first_bad, self._bad_code, self._nonfinite_code, self.iteration + 1)
                self.iteration += 1
                window_iters += 1
                bar.update(1)
                at_log = self.iteration % cfg["log_every"] == 0 or self.iteration == total
                at_checkpoint = cfg["checkpoint_every"] and self.iteration % cfg["checkpoint_every"] == 0
                at_eval = cfg["eval_every"] and self.iteration % cfg["eval_every"] == 0 and self.iteration != total
                if at_log or at_checkpoint or at_eval or self.iteration == total:
                    self._check_finite()
                if at_log:
                    elapsed = time.perf_counter() - window_start
                    last = {k: float(v) for k, v in metrics.items()}
                    last.update(iteration=self.iteration, lr=self.scheduler.get_last_lr()[0],
                                it_per_s=window_iters / elapsed, time=time.time())
                    logger.log(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", active=f"{last['active_triplets']:.0f}")
                    window_start, window_iters = time.perf_counter(), 0
                if at_checkpoint or self.iteration == total:
                    self.save_checkpoint()
                if at_eval:
                    self.evaluate(tag=f"iter_{self.iteration:07d}")
                    self.model.train()
        except KeyboardInterrupt:  # a second Ctrl-C (or one before the handlers): abort, save nothing
            bar.close()
            latest = ckpt.latest_checkpoint(self.checkpoint_dir)
            self._say(f"aborted during iteration {self.iteration + 1} without saving; last checkpoint: "
                      f"{latest or 'none'}")
            raise
        finally:
            stop.uninstall()
            bar.close()
            logger.close()
        return last

    def _agree_to_stop(self, requested: bool) -> bool:
        """Whether any rank was asked to stop (one tiny CPU all-reduce per step under DDP)."""
        if not self.dist.enabled:
            return requested
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._vote_group)
        return bool(flag.item())

    def _check_finite(self) -> None:
        """Raise NonFiniteLossError if any step since the start went non-finite (one host sync;
        under DDP every rank learns the verdict of all)."""
        first_bad = getattr(self, "_first_bad", None)
        if first_bad is None:
            return
        found = torch.stack([first_bad, -self._bad_code])
        if self.dist.enabled:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
        bad, code = (int(v) for v in found.tolist())
        if bad != _NEVER:
            what = [name for bit, name in zip((1, 2, 4, 8), ("the loss", "the embeddings", "the triplet distances",
                                                             "the gradient norm")) if -code & bit]
            self._raise_nonfinite(bad, " and ".join(what) or "the loss")

    def _raise_nonfinite(self, iteration: int, what: str):
        latest = ckpt.latest_checkpoint(self.checkpoint_dir)
        amp_hint = {torch.float16: ", or train.amp=bf16 or fp32 instead of fp16",
                    torch.bfloat16: ", or train.amp=fp32"}.get(self.amp_dtype, "")
        raise NonFiniteLossError(
            f"training diverged: {what} became NaN/inf at iteration {iteration}; stopped without saving that state. "
            f"Last good checkpoint: {latest or 'none yet'}. Try a lower train.lr (now {self.config['train']['lr']:g}) or "
            f"train.grad_clip=1.0{amp_hint}" + (", and --resume from that checkpoint" if latest else "")
        )

    def _clear_previous_run(self) -> None:
        """--overwrite: remove the previous run's metrics, checkpoints, reports and TensorBoard logs."""
        self._say(f"--overwrite: removing the previous run in {self.output} ({', '.join(self._existing_run)})")
        (self.output / "metrics.jsonl").unlink(missing_ok=True)
        for _, path in ckpt.list_checkpoints(self.checkpoint_dir):
            path.unlink(missing_ok=True)
        for folder in ("eval", "tensorboard"):
            shutil.rmtree(self.output / folder, ignore_errors=True)
        self._existing_run = []

    def _set_aside_newer_checkpoints(self) -> None:
        """Resuming from an earlier checkpoint: move the later ones (another timeline) to
        ``checkpoints/superseded-<time>/`` so they neither count as newer nor get pruned."""
        newer = [p for it, p in ckpt.list_checkpoints(self.checkpoint_dir) if it > self.iteration]
        if not newer:
            return
        aside = self.checkpoint_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for path in newer:
            path.rename(aside / path.name)
        self._say(f"moved {len(newer)} checkpoint(s) later than iteration {self.iteration} to {aside}")

    def evaluate(self, tag: str = "final") -> Optional[dict]:
        """Rank-1 evaluation on the test split (rank 0); writes the report under ``output/eval``."""
        result = None
        if self.dist.is_main:
            test_set = self._test_set
            if test_set is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    test_set = gait_data.GaitDataset(self.data_root, self.partition, "test", cache=False,
                                                     on_error=self.config["data"]["on_error"], progress=False,
                                                     in_use=self.config["data"]["in_use"])
                _check_protocol(test_set, self.config["data"]["protocol"], eval_options(self.config)["probe"])
                self._test_set = test_set
            result = evaluate_model(self.model, test_set, protocol=self.config["data"]["protocol"],
                                    metric=self.config["eval"]["metric"], device=self.device,
                                    autocast=self.eval_autocast, workers=self.config["eval"]["workers"],
                                    progress=self.progress, frames_all_limit=self.config["eval"]["frames_all_limit"],
                                    **eval_options(self.config))
            if self.config["eval"]["baseline"] and self._baseline is None:
                self._baseline = gait_energy_baseline(test_set, None, self.config["data"]["protocol"],
                                                      self.config["eval"]["metric"], **eval_options(self.config))
            report_results(result, self._baseline, self.output / "eval", tag=tag, printer=self._say)
        distributed.barrier(self.dist)
        return result

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def close(self) -> None:
        distributed.cleanup()


def gait_energy_baseline(data, partition: Optional[Path], protocol: str, metric: str, **options) -> dict:
    """The GEI baseline on ``data`` (a test ``GaitDataset``, or a dataset root with ``partition``)."""
    from ..evaluation import gei_baseline

    return gei_baseline(data, partition, protocol=protocol, metric=metric, **options)


# --- synthetic default data ----------------------------------------------------------------


def data_paths(data_cfg: dict) -> tuple[Path, Optional[Path]]:
    """``(root, partition)`` a data config names: ``data.root`` or the synthetic set's cache folder;
    ``data.partition``, else the CASIA-B split ``data.split`` of the root's subjects (a
    ``CasiaBSplit``, made when the dataset is read: nothing is written into the dataset folder),
    else None (the dataset then reads ``ROOT/partition.json``)."""
    if data_cfg["root"]:
        root = Path(data_cfg["root"]).expanduser()
    else:
        root = synthetic_root(data_cfg["synthetic"]["preset"], data_cfg["synthetic"]["seed"])
    if data_cfg["partition"]:
        return root, Path(data_cfg["partition"]).expanduser()
    if data_cfg["split"]:
        return root, gait_data.CasiaBSplit(str(data_cfg["split"]).upper())
    return root, None


def cache_dir() -> Path:
    return Path(os.environ.get("FASTGAIT_CACHE", Path.home() / ".cache" / "fastgait")).expanduser()


def synthetic_root(preset: str, seed: int) -> Path:
    from ..data.synthetic import GENERATOR_VERSION

    return cache_dir() / "synthetic" / f"{preset}-seed{seed}-v{GENERATOR_VERSION}"


def ensure_synthetic(root: Path, preset: str, seed: int, progress: bool = True) -> Path:
    """Generate the synthetic dataset once (an interrupted generation is completed, not redone)."""
    if (root / "meta.json").exists():  # the generator writes it last
        return root
    from ..data.synthetic import generate

    print(f"generating the synthetic '{preset}' dataset (seed {seed}) in {root} (once; cached) ...", flush=True)
    return generate(root, preset=preset, seed=seed, progress=progress)


# --- logging -------------------------------------------------------------------------------


class MetricsLogger:
    """JSONL log (``output/metrics.jsonl``) plus TensorBoard when it is installed."""

    def __init__(self, output: Path, enabled: bool, resume_from: int = 0):
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        path = output / "metrics.jsonl"
        if resume_from and path.exists():  # drop lines past the checkpoint we resume from (kept aside)
            kept, dropped = [], []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    iteration = json.loads(line)["iteration"]
                except (ValueError, KeyError, TypeError):  # a line cut by a kill: drop it
                    continue
                (kept if iteration <= resume_from else dropped).append(line)
            if dropped:
                aside = output / f"metrics.superseded-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
                aside.write_text("".join(line + "\n" for line in dropped), encoding="utf-8")
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif path.exists():
            path.unlink()
        self.file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.writer = None

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(_json_safe(metrics), allow_nan=False) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if key not in ("iteration", "time"):
                    self.writer.add_scalar(f"train/{key}", value, metrics["iteration"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="it", dynamic_ncols=True)


@torch.no_grad()
def nonfinite_code(loss: torch.Tensor, embeddings: torch.Tensor, distances: Optional[torch.Tensor],
                   grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """On the device, no host sync: bit 1 the loss, 2 the embeddings, 4 the distances, 8 the
    gradient norm is NaN/inf (0: all finite)."""
    zero = torch.zeros((), dtype=torch.bool, device=loss.device)
    flags = (
        ~torch.isfinite(loss.detach()),
        ~torch.isfinite(embeddings.detach()).all(),
        ~torch.isfinite(distances.detach()).all() if distances is not None else zero,
        ~torch.isfinite(grad_norm.detach()).to(loss.device) if grad_norm is not None else zero,
    )
    return sum(flag.long() * bit for flag, bit in zip(flags, (1, 2, 4, 8)))


@torch.no_grad()
def record_nonfinite(first_bad: torch.Tensor, bad_code: torch.Tensor, code: torch.Tensor, iteration: int):
    """``(first_bad, bad_code)`` updated on the device: the first iteration whose ``code`` is non-zero."""
    newly = (first_bad == _NEVER) & (code > 0)
    return (torch.where(newly, torch.full_like(first_bad, iteration), first_bad),
            torch.where(newly, code, bad_code))


def _build_model_checked(model_cfg: dict):
    """``build_model``, with a bad model key named as a config error (not a TypeError traceback)."""
    import inspect

    from ..models import MODELS

    try:
        return build_model(model_cfg)
    except TypeError as error:
        cls = MODELS.get(model_cfg.get("name"))
        known = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")] if cls else []
        raise ConfigError(f"model: {' '.join(str(error).split())}; the model.* keys are the constructor arguments of "
                          f"{model_cfg.get('name')}: {', '.join(known)}") from None
    except ValueError as error:
        raise ConfigError(f"model: {' '.join(str(error).split())}") from None


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf become null / "inf" / "-inf" (JSON has no NaN)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        out[key] = value
    return out


def _grad_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients, on the device (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(grads)
    else:  # pragma: no cover - old torch
        norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _check_protocol(test_set, protocol: str, probe=None) -> None:
    """The test split has gallery and probe sequences under ``protocol`` (before training, not after)."""
    from ..evaluation.protocols import check_protocol

    try:
        check_protocol(test_set.subject_ids, test_set.types, test_set.views, protocol,
                       probe if probe is not None else getattr(test_set, "probe_set", None))
    except ValueError as error:
        raise InputError(f"data.protocol={protocol} does not fit the test split of {test_set.root}: {error}; set "
                         "data.protocol to match the dataset, or fix the partition's TEST_SET") from None


class _StopRequest:
    """SIGINT / SIGTERM set a flag that the loop reads between steps (so the checkpoint is that of
    a step boundary and the resume is exact); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.requested = False
        self.reason = ""
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if os.getpid() != self._pid:  # a forked loader worker: the main process decides
            return
        if not self.requested:
            self.requested = True
            self.reason = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            if self.is_main:  # os.write: print() is not reentrant, and the handler may run inside one
                os.write(2, f"\n{self.reason}: saving a checkpoint after this iteration "
                            "(Ctrl-C again to abort without saving)\n".encode())

    def install(self) -> None:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                return

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

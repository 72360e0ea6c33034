"""The training loop: P x K triplet training with AMP, torch.compile, DDP, checkpoints and evaluation."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import data as gait_data
from .._nvtx import nvtx_range
from ..models import build_model
from ..nn import CrossEntropyLoss, TripletLoss
from ..ops.masks import set_batch_shard
from . import checkpoint as ckpt
from . import distributed
from .evaluation import evaluate_model, report_results

KEEP_CHECKPOINTS = 3


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped before writing anything from that state."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the trainer saved a checkpoint and stopped."""


def resolve_device(requested: Optional[str] = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


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

    def __init__(self, config: dict, output: Path, *, device: Optional[str] = None, progress: bool = True):
        self.config = config
        self.output = Path(output)
        self.device = resolve_device(device)
        self.dist = distributed.setup(self.device.type)
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
            on_error=config["data"]["on_error"], progress=self.progress,
        )
        model_cfg = dict(config["model"])
        if model_cfg.get("num_classes") == "auto":
            model_cfg["num_classes"] = self.train_set.num_ids
        self.model_config = model_cfg
        model = build_model(model_cfg).to(self.device)
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

    # --- setup ---------------------------------------------------------------------------

    def _prepare_data(self) -> tuple[Path, Optional[Path]]:
        """``data_paths`` of the config, after generating the synthetic set / split file (rank 0)."""
        data_cfg = self.config["data"]
        root, partition = data_paths(data_cfg)
        if self.dist.is_main:
            if not data_cfg["root"]:
                synthetic = data_cfg["synthetic"]
                ensure_synthetic(root, synthetic["preset"], synthetic["seed"], progress=self.progress)
            if partition is not None and data_cfg["partition"] is None and not partition.exists():
                gait_data.write_casia_b_partition(root, data_cfg["split"].upper(), partition)
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
        state = self.state_dict()  # every rank takes part (RNG gather)
        if not self.dist.is_main:
            return None
        path = ckpt.save_atomic(state, ckpt.checkpoint_path(self.checkpoint_dir, self.iteration))
        ckpt.prune_checkpoints(self.checkpoint_dir, KEEP_CHECKPOINTS)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes; resume with the same number "
                             f"(now {self.dist.world_size}) to continue exactly")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"][self.dist.rank])
        self.iteration = int(state["iteration"])

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
        with nvtx_range("optimizer"):
            if self.config["train"]["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config["train"]["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        # The logged total is the global objective: the triplet loss of the gathered batch plus the
        # weighted CE of the global batch (not the rank's scaled loss).
        total = info["loss"] + (self.ce_weight * global_ce[0] if global_ce is not None else 0.0)
        return {"total_loss": total.detach(), **info}

    def train(self, resume: Optional[Path] = None) -> dict[str, Any]:
        """Train to ``train.iterations``; returns the last logged metrics (and the evaluation, if run)."""
        cfg = self.config["train"]
        if resume:
            self.load_checkpoint(resume)
            self._say(f"resumed from {resume} at iteration {self.iteration}")
        total = int(cfg["iterations"])
        loader = gait_data.make_train_loader(
            self.train_set, cfg["P"], cfg["K"], clip_len=cfg["clip_len"], workers=self.config["data"]["workers"],
            rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg["seed"], start_iteration=self.iteration)
        logger = MetricsLogger(self.output, enabled=self.dist.is_main, resume_from=self.iteration)
        bar = _progress_bar(total, self.iteration, self.progress)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        last: dict[str, Any] = {}
        window_start, window_iters = time.perf_counter(), 0
        self.model.train()
        previous_handler = _sigterm_as_interrupt()
        try:
            # Starting the loader draws a worker seed from torch's generator: keep that out of
            # the stream the model draws from, so a resumed run draws exactly what it would have.
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            while self.iteration < total:
                sils, labels = next(batches)
                with nvtx_range(f"step {self.iteration}"):
                    metrics = self.train_step(sils, labels)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(metrics["total_loss"]),
                                        torch.full_like(first_bad, self.iteration + 1), first_bad)
                self.iteration += 1
                window_iters += 1
                bar.update(1)
                at_log = self.iteration % cfg["log_every"] == 0 or self.iteration == total
                at_checkpoint = cfg["checkpoint_every"] and self.iteration % cfg["checkpoint_every"] == 0
                if at_log or at_checkpoint or self.iteration == total:
                    self._check_finite(first_bad)
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
                if cfg["eval_every"] and self.iteration % cfg["eval_every"] == 0 and self.iteration != total:
                    self.evaluate(tag=f"iter_{self.iteration:07d}")
                    self.model.train()
        except KeyboardInterrupt:
            bar.close()
            self._check_finite(first_bad)
            path = self.save_checkpoint()
            if path:
                self._say(f"interrupted at iteration {self.iteration}; checkpoint saved to {path}; "
                          f"continue with --resume {path}")
            raise TrainingInterrupted(str(path)) from None
        finally:
            _restore_sigterm(previous_handler)
            bar.close()
            logger.close()
        return last

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad)
        if bad >= 0:
            latest = ckpt.latest_checkpoint(self.checkpoint_dir)
            raise NonFiniteLossError(
                f"the loss became NaN/inf at iteration {bad}; training stopped without saving. "
                f"Last good checkpoint: {latest or 'none yet'}. Try a lower train.lr, train.amp=bf16 or fp32 "
                "instead of fp16, or train.grad_clip=1.0"
            )

    def evaluate(self, tag: str = "final") -> Optional[dict]:
        """Rank-1 evaluation on the test split (rank 0); writes the report under ``output/eval``."""
        result = None
        if self.dist.is_main:
            test_set = gait_data.GaitDataset(self.data_root, self.partition, "test", cache=False, progress=False)
            result = evaluate_model(self.model, test_set, protocol=self.config["data"]["protocol"],
                                    metric=self.config["eval"]["metric"], device=self.device,
                                    autocast=self.eval_autocast, workers=self.config["eval"]["workers"],
                                    progress=self.progress)
            if self.config["eval"]["baseline"] and self._baseline is None:
                self._baseline = gait_energy_baseline(self.data_root, self.partition, self.config["data"]["protocol"],
                                                      self.config["eval"]["metric"])
            report_results(result, self._baseline, self.output / "eval", tag=tag, printer=self._say)
        distributed.barrier(self.dist)
        return result

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def close(self) -> None:
        distributed.cleanup()


def gait_energy_baseline(root: Path, partition: Optional[Path], protocol: str, metric: str) -> dict:
    from ..evaluation import gei_baseline

    return gei_baseline(root, partition, protocol=protocol, metric=metric)


# --- synthetic default data ----------------------------------------------------------------


def data_paths(data_cfg: dict) -> tuple[Path, Optional[Path]]:
    """``(root, partition)`` a data config names: ``data.root`` or the synthetic set's cache folder;
    ``data.partition``, else the CASIA-B split file ``ROOT/partition_<SPLIT>.json``, else None
    (the dataset then reads ``ROOT/partition.json``)."""
    if data_cfg["root"]:
        root = Path(data_cfg["root"]).expanduser()
    else:
        root = synthetic_root(data_cfg["synthetic"]["preset"], data_cfg["synthetic"]["seed"])
    if data_cfg["partition"]:
        return root, Path(data_cfg["partition"]).expanduser()
    if data_cfg["split"]:
        return root, root / f"partition_{data_cfg['split'].upper()}.json"
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
        if resume_from and path.exists():  # drop lines past the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] <= resume_from]
            path.write_text("".join(line + "\n" for line in kept))
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
        self.file.write(json.dumps(metrics) + "\n")
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


def _sigterm_as_interrupt():
    """A SIGTERM (cluster pre-emption) saves a checkpoint like Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)

"""The training job: resume, Ctrl-C, the NaN guard, bad data, DDP equivalence, recipes, learning."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgait.config import ConfigError, available_configs, load_config
from fastgait.engine import checkpoint as ckpt
from fastgait.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from fastgait.models import build_model
from fastgait.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def tiny_config(root, **train):
    overrides = {"iterations": 4, "P": 2, "K": 2, "clip_len": 6, "log_every": 1, "checkpoint_every": 2,
                 "compile": False, "amp": "fp32", "lr": 1e-3, **train}
    return load_config("demo_cpu", [f"data.root={root}", "data.workers=0", "eval.workers=0",
                                    "eval.baseline=false", *[f"train.{k}={v}" for k, v in overrides.items()]])


def read_losses(output):
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["iteration"]: json.loads(line)["loss"] for line in lines}


def run(config, output, resume=None):
    trainer = Trainer(config, output, progress=False)
    try:
        trainer.train(resume)
    finally:
        trainer.close()
    return trainer


def test_resume_after_interrupt_reproduces_the_losses(tiny_root, tmp_path, monkeypatch):
    config = tiny_config(tiny_root)
    run(config, tmp_path / "straight")
    expected = read_losses(tmp_path / "straight")
    assert sorted(expected) == [1, 2, 3, 4]

    # A real Ctrl-C (SIGINT) in the middle of iteration 3: the step finishes, a checkpoint at 3.
    original = Trainer.train_step

    def interrupted(self, *args):
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(TrainingInterrupted):
        run(config, tmp_path / "split")
    monkeypatch.setattr(Trainer, "train_step", original)
    saved = ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints")
    assert saved.name == "iter_0000003.pt"
    run(config, tmp_path / "split", resume=saved)
    assert read_losses(tmp_path / "split") == expected  # bit-identical losses after the resume


def test_checkpoint_is_weights_only_loadable(tiny_root, tmp_path):
    run(tiny_config(tiny_root, iterations=2), tmp_path)
    state = torch.load(ckpt.checkpoint_path(tmp_path / "checkpoints", 2), weights_only=True)
    assert state["iteration"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path, monkeypatch):
    config = tiny_config(tiny_root, log_every=4)
    original = Trainer.train_step

    def poisoned(self, sils, labels):
        if self.iteration == 2:  # the third iteration's input (so its embeddings and loss) is NaN
            sils = sils * float("nan")
        return original(self, sils, labels)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        run(config, tmp_path)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*.pt"))
    assert checkpoints == ["iter_0000002.pt"]
    assert torch.load(tmp_path / "checkpoints" / checkpoints[0], weights_only=True)["iteration"] == 2


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = ckpt.save_atomic({"x": torch.ones(2)}, tmp_path / "a.pt")

    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        ckpt.save_atomic({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = train_main([f"data.root={tmp_path / 'nowhere'}", "--quiet", "--output", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "does not exist" in err


def test_corrupt_dataset_names_the_file(tiny_root, tmp_path, capsys):
    root = tmp_path / "data"
    for src in tiny_root.rglob("*"):
        dst = root / src.relative_to(tiny_root)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.write_bytes(src.read_bytes())
    bad = root / "002" / "nm-01" / "090" / "090.pkl"
    bad.write_bytes(b"\x80\x04not a pickle")
    code = train_main([f"data.root={root}", "--quiet", "--output", str(tmp_path / "run"), "train.iterations=1"])
    assert code == 2
    assert str(bad) in capsys.readouterr().err


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="train.iteration"):
        load_config("demo_cpu", ["train.iteration=5"])
    with pytest.raises(FileNotFoundError, match="recipes"):
        load_config("no_such_recipe")


@pytest.mark.parametrize("name", available_configs())
def test_every_recipe_builds_its_model(name):
    config = load_config(name)
    model_cfg = dict(config["model"])
    if model_cfg.get("num_classes") == "auto":
        model_cfg["num_classes"] = 10
    model = build_model(model_cfg)
    assert model.parts > 0
    assert config["train"]["iterations"] > 0 and config["train"]["P"] * config["train"]["K"] > 1


def _torchrun(nproc, root, output, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastgait.train", "--quiet", "--no-eval", "--output", str(output), f"data.root={root}",
               "data.workers=0", "train.iterations=3", "train.P=2", "train.K=2", "train.clip_len=6",
               "train.log_every=1", "train.checkpoint_every=0", "train.lr=1e-3", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_gloo_matches_one_process(tiny_root, tmp_path):
    """Same global batch (P x K = 4): one process with 4 clips, two with 2 each (masks included)."""
    _torchrun(1, tiny_root, tmp_path / "one")
    _torchrun(2, tiny_root, tmp_path / "two")
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4, abs=1e-6), (it, one, two)


@pytest.mark.slow
def test_short_run_learns_on_the_small_synthetic_preset(tmp_path):
    """End to end on the small synthetic preset: clearly above the untrained model and the GEI baseline."""
    config = load_config("demo_cpu", ["train.iterations=300", "train.milestones=[250]", "eval.baseline=true"])
    trainer = Trainer(config, tmp_path, progress=False)
    try:
        untrained = trainer.evaluate(tag="untrained")["NM"]["mean"]
        trainer.train()
        trained = trainer.evaluate()["NM"]["mean"]
    finally:
        trainer.close()
    baseline = json.loads((tmp_path / "eval" / "rank1_gei_baseline.json").read_text())["NM"]["mean"]
    assert trained > untrained + 20 and trained > baseline + 10, (untrained, trained, baseline)


def test_evaluate_cli_reports_a_checkpoint(tiny_root, tmp_path, capsys):
    from fastgait.evaluate import main as evaluate_main

    run(tiny_config(tiny_root, iterations=2), tmp_path / "run")
    checkpoint = ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 2)
    assert evaluate_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "eval"), "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "| model NM |" in out
    report = json.loads((tmp_path / "eval" / "rank1_iter_0000002.json").read_text())
    assert set(report) == {"NM", "BG", "CL"} and 0 <= report["NM"]["mean"] <= 100
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2

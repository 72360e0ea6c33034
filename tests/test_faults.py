"""Fault injection against the training / evaluation CLIs (issue 15).

Each test plays one fault: a diverging run, Ctrl-C / SIGTERM (also under torchrun), a second run
into a folder, overrides on --resume, bad test data, bad configs and files, a full disk, kills
during a checkpoint write. A run never ends green with a broken model, never loses a user's data,
and every bad input is one ``error:`` line (exit 2) naming the key or file, without a traceback.
"""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgait.config import ConfigError, load_config
from fastgait.data import write_partition
from fastgait.engine import checkpoint as ckpt
from fastgait.engine.trainer import MetricsLogger, Trainer
from fastgait.evaluate import main as evaluate_main
from fastgait.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.workers=0", "eval.workers=0", "eval.baseline=false", "train.P=2", "train.K=2", "train.clip_len=6",
        "train.log_every=1", "train.compile=false", "train.amp=fp32", "train.lr=1e-3", "--quiet"]


def copy_root(root, dst):
    shutil.copytree(root, dst)
    return dst


def train(root, output, *extra, capsys=None):
    """``python -m fastgait.train`` in this process; returns (exit code, stdout, stderr)."""
    code = train_main([f"data.root={root}", "--output", str(output), *TINY, *extra])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def strict_json_lines(path):
    """The lines of a JSONL file, parsed strictly (NaN / Infinity are not JSON)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def losses(output):
    return {m["iteration"]: m["loss"] for m in strict_json_lines(Path(output) / "metrics.jsonl")}


def assert_one_error_line(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# --- 1. divergence ---------------------------------------------------------------------------


def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(tiny_root, tmp_path, capsys):
    """lr=1e6, checkpoint every step: before the fix exit 0, loss 0.0, NaN checkpoints only."""
    out = tmp_path / "run"
    code, _, err = train(tiny_root, out, "train.iterations=8", "train.checkpoint_every=1", "train.lr=1e6",
                         capsys=capsys)
    assert_one_error_line(code, err, "diverged", "NaN/inf at iteration", "train.lr", exit_code=1)
    checkpoints = ckpt.list_checkpoints(out / "checkpoints")
    assert checkpoints, "the last finite checkpoint must survive"
    bad_at = int(err.split("NaN/inf at iteration ")[1].split(";")[0])
    assert checkpoints[-1][0] == bad_at - 1  # the newest is the step before the first non-finite one
    for _, path in checkpoints:  # every checkpoint on disk is finite
        assert ckpt.nonfinite_tensors(ckpt.load_checkpoint(path)["model"]) == []
    assert str(checkpoints[-1][1]) in err
    logged = strict_json_lines(out / "metrics.jsonl")  # valid JSON, and no line past the divergence
    assert [m["iteration"] for m in logged] == list(range(1, bad_at))


def test_guard_sees_a_nonfinite_gradient_with_a_finite_loss(tiny_root, tmp_path, monkeypatch):
    """What breaks first may be the gradient alone (the loss still finite): the guard catches it."""
    config = load_config("demo_cpu", [f"data.root={tiny_root}", *[o for o in TINY if "=" in o],
                                      "train.iterations=4", "train.checkpoint_every=1", "train.log_every=4"])
    original = Trainer.train_step

    def poisoned(self, sils, labels):
        if self.iteration == 2:
            handle = next(self.model.parameters()).register_hook(lambda g: g * float("inf"))
            try:
                return original(self, sils, labels)
            finally:
                handle.remove()
        return original(self, sils, labels)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    trainer = Trainer(config, tmp_path, progress=False, check_eval=False)
    try:
        with pytest.raises(Exception, match="gradient norm became NaN/inf at iteration 3"):
            trainer.train()
    finally:
        trainer.close()
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [1, 2]


def test_evaluate_refuses_a_nonfinite_model(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_root, out, "train.iterations=2", "--no-eval", capsys=capsys)[0] == 0
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(out / "checkpoints", 2))
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name] * float("nan")
    broken = ckpt.save_atomic(state, tmp_path / "nan.pt")
    code = evaluate_main(["--checkpoint", str(broken), "--no-baseline", "--output", str(tmp_path / "eval")])
    assert_one_error_line(code, capsys.readouterr().err, str(broken), "NaN/inf weights")
    assert not (tmp_path / "eval").exists()


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for it in (7, 8, 9):
        ckpt.save_atomic({"i": it}, ckpt.checkpoint_path(tmp_path, it))
    newest = ckpt.save_atomic({"i": 3}, ckpt.checkpoint_path(tmp_path, 3))
    ckpt.prune_checkpoints(tmp_path, 2, protect=newest)
    assert newest.exists() and [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [3, 8, 9]


# --- 2. Ctrl-C and exact resume --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_sigint_at_a_random_iteration_then_resume_equals_an_uninterrupted_run(tiny_root, tmp_path, seed, monkeypatch,
                                                                              capsys):
    """Before: the interrupt checkpoint held the RNG state after the step had drawn its masks
    (6 of 7 resumes diverged by up to 0.01). After: the stop happens at a step boundary."""
    extra = ("train.iterations=6", "train.checkpoint_every=0", "--no-eval")
    assert train(tiny_root, tmp_path / "straight", *extra, capsys=capsys)[0] == 0
    expected = losses(tmp_path / "straight")
    stop_in = random.Random(seed).randrange(0, 5)  # SIGINT during step stop_in + 1 (0-based iteration stop_in)
    original = Trainer.train_step

    def interrupted(self, *args):
        if self.iteration != stop_in:
            return original(self, *args)
        # Ctrl-C at the end of the forward pass: the step has drawn its batch and its masks
        handle = self.model.register_forward_hook(lambda *_: os.kill(os.getpid(), signal.SIGINT))
        try:
            return original(self, *args)
        finally:
            handle.remove()

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    code, out, _ = train(tiny_root, tmp_path / "split", *extra, capsys=capsys)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert code == 130
    saved = ckpt.checkpoint_path(tmp_path / "split" / "checkpoints", stop_in + 1)
    assert saved.exists() and f"--resume {saved}" in out
    assert train(tiny_root, tmp_path / "split", *extra, "--resume", capsys=capsys)[0] == 0
    assert losses(tmp_path / "split") == expected  # bit-identical, every iteration


# --- 3. SIGTERM under torchrun (slow) ----------------------------------------------------------


def _torchrun(nproc, root, output, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastgait.train", "--no-eval", "--output", str(output), f"data.root={root}",
               *[o for o in TINY if o != "data.workers=0"], *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_lines(path, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no progress")


@pytest.mark.slow
def test_torchrun_sigterm_leaves_a_loadable_checkpoint_and_resumes_exactly(tiny_root, tmp_path):
    """Before: a gloo "collective mismatch" abort or a killed DataLoader worker, nothing saved.
    After: the ranks agree on the stopping step, rank 0 saves, the resume equals a straight run."""
    extra = ("train.iterations=40", "train.checkpoint_every=0", "data.workers=1")  # loader workers: signalled too
    straight = _torchrun(2, tiny_root, tmp_path / "straight", *extra)
    assert straight.wait(600) == 0, straight.communicate()[1][-3000:]
    expected = losses(tmp_path / "straight")

    proc = _torchrun(2, tiny_root, tmp_path / "split", *extra)
    _wait_for_lines(tmp_path / "split" / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    _, err = proc.communicate(timeout=300)
    saved = ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints")
    assert saved is not None, err[-3000:]
    state = torch.load(saved, weights_only=True)
    assert state["world_size"] == 2 and 3 <= state["iteration"] < 40 and len(state["rng"]) == 2
    assert "collective" not in err.lower() and "killed by signal" not in err
    resumed = _torchrun(2, tiny_root, tmp_path / "split", *extra, "--resume")
    assert resumed.wait(600) == 0, resumed.communicate()[1][-3000:]
    got = losses(tmp_path / "split")
    assert sorted(got) == sorted(expected)
    for it in expected:
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-7), it


@pytest.mark.slow
def test_torchrun_preflight_failure_on_rank0_stops_every_rank(tiny_root, tmp_path):
    """Rank 0 checks the test split; the others must not train on alone (and hang)."""
    root = copy_root(tiny_root, tmp_path / "data")
    bad = root / "006" / "cl-01" / "000" / "000.pkl"
    bad.write_bytes(b"garbage")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastgait.train", "--output", str(tmp_path / "run"), f"data.root={root}", *TINY,
               "train.iterations=5"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"error: test split: cannot read {bad}" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_external_sigint_to_the_cli_then_resume_equals_an_uninterrupted_run(tiny_root, tmp_path):
    """A real Ctrl-C from outside (the whole process group, loader workers included) at a
    seeded random point of the run."""
    extra = ["train.iterations=30", "train.checkpoint_every=0", "--no-eval", "data.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def cli(output, *more):
        command = [sys.executable, "-m", "fastgait.train", f"data.root={tiny_root}", "--output", str(output),
                   *[o for o in TINY if o != "data.workers=0"], *extra, *more]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    assert cli(tmp_path / "straight").wait(600) == 0
    expected = losses(tmp_path / "straight")
    proc = cli(tmp_path / "split")
    _wait_for_lines(tmp_path / "split" / "metrics.jsonl", random.Random(7).randrange(2, 20), proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert cli(tmp_path / "split", "--resume").wait(600) == 0
    assert losses(tmp_path / "split") == expected


# --- 4. a new run into an existing run folder -------------------------------------------------


def test_a_fresh_run_refuses_a_folder_holding_another_run(tiny_root, tmp_path, capsys):
    """Before: metrics.jsonl deleted, the new checkpoints pruned at once (the old ones count as
    newer). After: refused, nothing touched; --overwrite replaces; --resume continues."""
    out = tmp_path / "run"
    assert train(tiny_root, out, "train.iterations=4", "train.checkpoint_every=2", "--no-eval", capsys=capsys)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = train(tiny_root, out, "train.iterations=2", "--no-eval", capsys=capsys)
    assert_one_error_line(code, err, str(out), "--resume", "--overwrite", "metrics.jsonl")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    code, _, _ = train(tiny_root, out, "train.iterations=2", "train.checkpoint_every=1", "--no-eval", "--overwrite",
                       capsys=capsys)
    assert code == 0
    assert [it for it, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1, 2]
    assert sorted(losses(out)) == [1, 2]


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_root, out, "train.iterations=6", "train.checkpoint_every=2", "--no-eval", capsys=capsys)[0] == 0
    first = ckpt.checkpoint_path(out / "checkpoints", 2)
    code, stdout, _ = train(tiny_root, out, "train.iterations=6", "train.checkpoint_every=2", "--no-eval",
                            "--resume", str(first), capsys=capsys)
    assert code == 0 and "later than iteration 2" in stdout
    assert [it for it, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4, 6]
    aside = [p.name for p in (out / "checkpoints").glob("superseded-*/*.pt")]
    assert sorted(aside) == ["iter_0000004.pt", "iter_0000006.pt"]  # the other timeline is kept, not pruned
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


# --- 5. overrides on --resume -----------------------------------------------------------------


def test_resume_applies_schedule_overrides_and_refuses_fixed_keys(tiny_root, tmp_path, capsys):
    """Before: train.lr=0.5 on --resume trained at the checkpoint's lr (but recorded 0.5); a
    different P/K was accepted; a different model gave a traceback."""
    out = tmp_path / "run"
    assert train(tiny_root, out, "train.iterations=2", "--no-eval", capsys=capsys)[0] == 0
    code, stdout, _ = train(tiny_root, out, "--resume", "train.iterations=4", "train.lr=0.01",
                            "train.milestones=[4]", "train.gamma=0.1", "--no-eval", capsys=capsys)
    assert code == 0 and "train.lr 0.001 -> 0.01" in stdout
    logged = {m["iteration"]: m["lr"] for m in strict_json_lines(out / "metrics.jsonl")}
    assert logged[1] == logged[2] == 1e-3  # before the resume
    # the lr logged at i is the next step's: 0.01, then x0.1 from the milestone at 4 on
    assert logged[3] == pytest.approx(0.01) and logged[4] == pytest.approx(1e-3)
    assert torch.load(ckpt.checkpoint_path(out / "checkpoints", 4), weights_only=True)["optimizer"]["param_groups"][0][
        "initial_lr"] == 0.01
    assert torch.load(ckpt.checkpoint_path(out / "checkpoints", 4), weights_only=True)["optimizer"]["param_groups"][0][
        "lr"] == pytest.approx(1e-3)
    for bad, key in (("train.P=3", "train.P"), ("train.K=3", "train.K"), ("model.preset=casia-b", "model.preset"),
                     ("train.seed=5", "train.seed"), ("loss.margin=0.3", "loss.margin")):
        code, _, err = train(tiny_root, out, "--resume", "train.iterations=6", bad, "--no-eval", capsys=capsys)
        assert_one_error_line(code, err, key, "--resume cannot change")
    assert sorted(losses(out)) == [1, 2, 3, 4]  # the refused resumes wrote nothing


# --- 6. everything a run needs is checked before the first iteration --------------------------


def _no_training_happened(out):
    return not (out / "metrics.jsonl").exists() and not ckpt.list_checkpoints(out / "checkpoints")


def test_bad_test_data_is_found_before_training(tiny_root, tmp_path, capsys):
    """Before: a corrupt or hostile test file, an empty TEST_SET, eval.metric=l2 or
    data.protocol=foo surfaced after the whole training run."""
    root = copy_root(tiny_root, tmp_path / "data")
    bad = root / "005" / "nm-02" / "090" / "090.pkl"
    bad.write_bytes(b"\x80\x04not a pickle")
    out = tmp_path / "run"
    code, _, err = train(root, out, "train.iterations=2", capsys=capsys)
    assert_one_error_line(code, err, str(bad), "data.on_error=skip")
    assert _no_training_happened(out)

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad.write_bytes(pickle.dumps(Hostile()))
    code, _, err = train(root, out, "train.iterations=2", capsys=capsys)
    assert_one_error_line(code, err, str(bad))
    assert _no_training_happened(out)

    # data.on_error=skip now covers the evaluation too: the run trains and evaluates without the file
    code, stdout, err = train(root, out, "train.iterations=2", "data.on_error=skip", "eval.baseline=true",
                              capsys=capsys)
    assert code == 0, err
    assert "1 unreadable sequence files left out" in stdout
    assert "| model NM |" in stdout and "| GEI+NN NM |" in stdout  # the baseline reads the same filtered split

    empty = tmp_path / "empty_test.json"
    write_partition(empty, ["001", "002", "003", "004"], [])
    code, _, err = train(tiny_root, tmp_path / "r2", f"data.partition={empty}", "train.iterations=2", capsys=capsys)
    assert_one_error_line(code, err, "test")
    assert _no_training_happened(tmp_path / "r2")

    code, _, err = train(tiny_root, tmp_path / "r3", "data.protocol=oumvlp", "train.iterations=2", capsys=capsys)
    assert_one_error_line(code, err, "no gallery", "data.protocol")
    assert _no_training_happened(tmp_path / "r3")

    for override, key in (("eval.metric=l2", "eval.metric"), ("data.protocol=foo", "data.protocol")):
        code, _, err = train(tiny_root, tmp_path / "r4", override, capsys=capsys)
        assert_one_error_line(code, err, key)


def test_unwritable_output_is_found_before_training(tiny_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = train(tiny_root, blocker / "run", "train.iterations=2", capsys=capsys)
    assert_one_error_line(code, err, str(blocker / "run"), "--output")


# --- 8. bad inputs: one line, exit 2, no traceback ----------------------------------------------


BAD_OVERRIDES = [
    (["train.iteration=5"], "train.iteration"),  # unknown key, with a suggestion
    (["--config", "no_such_recipe"], "no_such_recipe"),
    (["train.log_every=0"], "train.log_every"),
    (["train.lr=abc"], "train.lr"),
    (["train.milestones=5"], "train.milestones"),
    (["train.iterations=abc"], "train.iterations"),
    (["train.P=8.5"], "train.P"),
    (["train.P=100"], "train.P=100"),
    (["data=5"], "data"),
    (["train.iterations=0"], "train.iterations"),  # 10: nothing to train
    (["train.K=1"], "train.K"),  # 10: no positive pair for the triplet loss
    (["train.lr=inf"], "train.lr"),
    (["train.lr=["], "train.lr"),
    (["train.amp=fp8"], "train.amp"),
    (["train.gamma=[0.1,0.1]"], "train.gamma"),
    (["data.workers=-1"], "data.workers"),
    (["model.name=NoSuchNet"], "model name"),
    (["model.no_such_arg=1"], "no_such_arg"),
    (["--device", "tpu"], "--device"),
    (["--resume", "--overwrite"], "--overwrite"),
]


@pytest.mark.parametrize("argv,needle", BAD_OVERRIDES, ids=[a[0] for a, _ in BAD_OVERRIDES])
def test_a_bad_config_is_one_error_line(tiny_root, tmp_path, capsys, argv, needle):
    code, _, err = train(tiny_root, tmp_path / "run", *argv, capsys=capsys)
    assert_one_error_line(code, err, needle)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu(tiny_root, tmp_path, capsys):
    code, _, err = train(tiny_root, tmp_path / "run", "--device", "cuda", capsys=capsys)
    assert_one_error_line(code, err, "CUDA is not available", "--device cpu")


@pytest.mark.parametrize("text,needle", [
    ("- a\n- list\n", "mapping"),
    ("train: {lr: [\n", "YAML"),
    ("train: !!python/object/apply:os.system ['echo pwned']\n", "python"),
    ("train:\n  iterations: 5\n  bogus: 1\n", "train.bogus"),
    ("data: 5\n", "data"),
])
def test_a_bad_recipe_file_is_one_error_line(tiny_root, tmp_path, capsys, text, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code, _, err = train(tiny_root, tmp_path / "run", "--config", str(recipe), capsys=capsys)
    assert_one_error_line(code, err, needle)


def test_debug_shows_the_traceback(tiny_root, tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        train_main([f"data.root={tiny_root}", "--output", str(tmp_path), "train.lr=abc", "--debug"])


@pytest.fixture(scope="module")
def trained_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_main([f"data.root={tiny_root}", "--output", str(out), *TINY, "train.iterations=2",
                       "train.checkpoint_every=1", "--no-eval"]) == 0
    return out


def _corruptions(good: Path):
    state = torch.load(good, weights_only=True)
    yield "truncated", lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    yield "empty", lambda p: p.write_bytes(b"")
    yield "garbage", lambda p: p.write_bytes(os.urandom(4096))
    yield "a tensor", lambda p: torch.save(torch.zeros(3), p)
    yield "missing parts", lambda p: torch.save({k: v for k, v in state.items() if k != "optimizer"}, p)
    shapes = {**state, "model": {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}}
    yield "wrong shapes", lambda p: torch.save(shapes, p)


def test_a_corrupt_newest_checkpoint_is_one_error_line(tiny_root, trained_run, tmp_path, capsys):
    """Before: 4 of 5 kinds of corrupt newest checkpoint gave a traceback on --resume."""
    good = ckpt.checkpoint_path(trained_run / "checkpoints", 2)
    for kind, corrupt in _corruptions(good):
        out = tmp_path / kind.replace(" ", "_")
        shutil.copytree(trained_run, out)
        newest = ckpt.checkpoint_path(out / "checkpoints", 2)
        corrupt(newest)
        code, _, err = train(tiny_root, out, "--resume", "train.iterations=3", "train.checkpoint_every=1", "--no-eval",
                             capsys=capsys)
        assert_one_error_line(code, err, str(newest))
        assert ckpt.checkpoint_path(out / "checkpoints", 1).exists(), kind  # the earlier one is untouched
        code = evaluate_main(["--checkpoint", str(newest), "--no-baseline"])
        assert_one_error_line(code, capsys.readouterr().err, str(newest))


def test_disk_full_is_one_error_line(tiny_root, tmp_path, capsys, monkeypatch):
    """Before: "enforce fail at inline_container.cc" with "No space left on device" buried."""
    def full_disk(path):
        return os.open("/dev/full", os.O_WRONLY), str(path.parent / f".{path.name}.x.tmp")

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    monkeypatch.setattr(ckpt, "_make_temp", full_disk)
    code, _, err = train(tiny_root, tmp_path / "run", "train.iterations=2", "--no-eval", capsys=capsys)
    assert_one_error_line(code, err, "no space left on device", "iter_0000002.pt")


@pytest.mark.parametrize("module,argv,needle", [
    ("fastgait.evaluation.gei", ["{tmp}/nowhere"], "nowhere"),
    ("fastgait.evaluation.gei", ["{root}", "--partition", "{tmp}/missing.json"], "missing.json"),
    ("fastgait.data.synthetic", ["{tmp}/afile/out"], "afile"),
    ("fastgait.data.pretreat", ["{tmp}/noraw", "{tmp}/out"], "noraw"),
    ("fastgait.evaluate", ["--checkpoint", "{tmp}/missing.pt"], "missing.pt"),
])
def test_other_clis_give_one_error_line(tiny_root, tmp_path, capsys, module, argv, needle):
    import importlib

    (tmp_path / "afile").write_text("a file, not a folder")
    argv = [a.format(tmp=tmp_path, root=tiny_root) for a in argv]
    code = importlib.import_module(module).main(argv)
    assert_one_error_line(code, capsys.readouterr().err, needle)


# --- 11. leftovers of kills, JSON, thread count ---------------------------------------------------


def test_stale_temporaries_are_removed_on_start_and_resume(tiny_root, trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    stale = out / "checkpoints" / ".iter_0000003.pt.abc123.tmp"  # what a kill during save_atomic leaves
    stale.write_bytes(b"partial")
    code, stdout, _ = train(tiny_root, out, "--resume", "train.iterations=3", "--no-eval", capsys=capsys)
    assert code == 0 and not stale.exists() and stale.name in stdout


def test_metrics_jsonl_is_valid_json_with_nan(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"iteration": 1, "loss": float("nan"), "grad": float("inf"), "x": 1.5})
    logger.close()
    assert strict_json_lines(tmp_path / "metrics.jsonl") == [{"iteration": 1, "loss": None, "grad": "inf", "x": 1.5}]


def test_k1_with_the_ce_loss_warns_first(tiny_root, tmp_path, capsys):
    """K=1 is refused for the triplet loss alone (above); with the CE loss it trains, with a warning."""
    code, stdout, err = train(tiny_root, tmp_path / "run", "train.K=1", "train.P=4", "loss.ce_weight=1",
                              "model.num_classes=auto", "train.iterations=1", "--no-eval", capsys=capsys)
    assert code == 0, err
    assert "warning: train.K=1" in stdout.splitlines()[0]


# --- the guard costs no host sync per step ------------------------------------------------------


def _host_reads_by_the_trainer(tiny_root, tmp_path, monkeypatch, iterations):
    """Count tensor -> host reads (item, tolist, bool, int, float) made from engine/trainer.py."""
    import fastgait.engine.trainer as trainer_module

    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller == trainer_module.__file__:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    config = load_config("demo_cpu", [f"data.root={tiny_root}", *[o for o in TINY if "=" in o],
                                      f"train.iterations={iterations}", f"train.log_every={iterations}",
                                      "train.checkpoint_every=0"])
    trainer = Trainer(config, tmp_path / str(iterations), progress=False, check_eval=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    monkeypatch.undo()
    return reads


def test_the_divergence_guard_reads_the_device_only_at_boundaries(tiny_root, tmp_path, monkeypatch):
    """The per-step guard is device-side: 2 or 6 steps to one log boundary read the same."""
    assert _host_reads_by_the_trainer(tiny_root, tmp_path, monkeypatch, 2) == \
        _host_reads_by_the_trainer(tiny_root, tmp_path, monkeypatch, 6)


@pytest.mark.gpu
def test_the_guard_does_not_synchronise_on_cuda():
    """On a GPU: the per-step guard (flags, first bad step, gradient norm) under
    torch.cuda.set_sync_debug_mode("error"), which raises on any host synchronisation."""
    from fastgait.engine.trainer import _NEVER, _grad_norm, nonfinite_code, record_nonfinite

    model = torch.nn.Linear(16, 16).cuda()
    x = torch.randn(8, 16, device="cuda")
    first_bad = torch.full((), _NEVER, dtype=torch.long, device="cuda")
    bad_code = torch.zeros((), dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for iteration in (1, 2):
            embeddings = model(x if iteration == 1 else x * float("nan"))
            loss = embeddings.square().mean()
            loss.backward()
            code = nonfinite_code(loss, embeddings, embeddings.norm(dim=1).mean(), _grad_norm(model.parameters()))
            first_bad, bad_code = record_nonfinite(first_bad, bad_code, code, iteration)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(first_bad) == 2 and int(bad_code) == 1 | 2 | 4 | 8

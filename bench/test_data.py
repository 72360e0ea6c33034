"""Loader throughput: sequences per second from the processed layout through ``make_train_loader``.

A synthetic set (``fastgait.data.synthetic``) is written once per session into a temporary
folder; each case times ``next(batches)`` of an infinite P x K loader, after a warm-up that
starts the workers and fills their prefetch queues. Host time (``time.perf_counter``): the
loader's output is on the host; the copy to the GPU is part of the step. Throughput is the
batch over the *mean* time per batch (prefetching makes single batches bimodal).

Providers: ``workers=N`` with the dataset cached in memory (the trainer's default, shared
copy-on-write by forked workers), and ``workers=N, disk`` reading the files each time.
The report sets the loader beside the fastgait step's throughput: the loader must keep up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest

from bench import _harness as h
from fastgait.data import GaitDataset, make_train_loader
from fastgait.data.synthetic import generate

OP = "data_loader"
CLIP_LEN = 30


@dataclass(frozen=True)
class LoaderConfig:
    name: str
    P: int
    K: int
    subjects: int  # of the synthetic set; all but one train
    views: tuple[str, ...]
    types: tuple[str, ...]
    workers: tuple[int, ...]
    rounds: int
    priority: int = h.PRIORITY["data"]

    def shape(self) -> dict:
        return {"P": self.P, "K": self.K, "clip_len": CLIP_LEN, "frames": [64, 44],
                "train_sequences": (self.subjects - 1) * len(self.views) * len(self.types)}


PAPER = [LoaderConfig("casia-b 8x16", 8, 16, 17, ("000", "036", "072", "108", "144", "180"),
                      ("nm-01", "nm-02", "bg-01", "cl-01"), (0, 4, 8), rounds=40)]
SMOKE = [LoaderConfig("tiny 2x2", 2, 2, 3, ("000", "090"), ("nm-01", "nm-02"), (0, 2), rounds=2)]


def shrink(config: LoaderConfig) -> LoaderConfig:
    return replace(config, rounds=4)


def cases(mode: h.Mode) -> list[h.Case]:
    out = []
    for config in mode.pick(PAPER, SMOKE, shrink):
        providers = [f"workers={w}" for w in config.workers] + [f"workers={max(config.workers)}, disk"]
        out += [h.Case(config, provider, "load", config.priority) for provider in providers]
    return out


@pytest.fixture(scope="session")
def synthetic_sets(tmp_path_factory):
    """``config -> root`` of its synthetic set, generated on first use."""
    roots = {}

    def root(config: LoaderConfig):
        if config.name not in roots:
            folder = tmp_path_factory.mktemp("synthetic") / "set"
            roots[config.name] = generate(
                folder, "small", seed=0, workers=os.cpu_count(), progress=False, subjects=config.subjects,
                train_subjects=config.subjects - 1, views=config.views, train_types=config.types,
                test_types=config.types[:1],
            )
        return roots[config.name]

    return root


def test_loader(benchmark, bench, case, synthetic_sets):
    config = case.config
    bench.require_time(30)
    bench.group(benchmark, OP, config.name)
    workers = int(case.provider.split(",")[0].removeprefix("workers="))
    dataset = GaitDataset(synthetic_sets(config), split="train", cache="disk" not in case.provider, progress=False)
    loader = make_train_loader(dataset, config.P, config.K, clip_len=CLIP_LEN, workers=workers, seed=0)
    batches = iter(loader)
    for _ in range(2 + workers):  # start the workers, fill the queues
        sils, labels = next(batches)
    assert tuple(sils.shape) == (config.P * config.K, CLIP_LEN, 64, 44) and sils.max() > 0

    times = bench.measure(benchmark, lambda: next(batches), lambda: ((), {}), rounds=config.rounds,
                          warmup_rounds=0, memory=False)
    mean_ms = times.get("mean_ms")
    bench.record(
        benchmark, case, OP, times, None, shape=config.shape() | {"workers": workers}, dtype="float32",
        throughput=config.P * config.K / (mean_ms * 1e-3) if mean_ms else None,
    )
    del batches, loader

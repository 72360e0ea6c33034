"""``triplet_loss`` (``kernels/triplet.py``): batch-all triplet loss, against its reference.

Providers: ``reference-eager`` (``impl="reference"``: builds the ``[p, n, K, n - K]`` hinge
terms), ``reference-compiled``, ``triton`` (forward: two launches, distances and hinges in one
kernel that also ranks the labels, then a one-program finish; backward: one launch; O(p·n²) memory).

Input: fp32 embeddings ``[n, c, p]`` as SeparateFCs leaves them (a permuted ``[p, n, c]``) and
labels of P identities x K sequences, outside autocast (the trainer's loss). With ``n = P·K``:
distances are a GEMM per part, ``gram = 2·p·n²·c`` FLOPs; the hinge terms ``p·n·K·(n-K)``
triplets, ~3 FLOPs each. Forward: ``gram + 3·triplets``; backward: ``2·gram`` (dE from dD)
``+ triplets`` (the active counts). Bytes: the embeddings (and their gradient). At these sizes
the op is bound by launches and latency, far from either floor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pytest
import torch

from bench import _harness as h
from fastgait.ops import triplet_loss

pytestmark = [h.TIMED, pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")]

OP = "triplet_loss"
PROVIDERS = ("reference-eager", "reference-compiled", "triton")
MARGIN = 0.2


@dataclass(frozen=True)
class TripletConfig:
    name: str
    identities: int  # P
    per_identity: int  # K
    c: int
    parts: int
    priority: int = h.PRIORITY["triplet"]

    @property
    def n(self) -> int:
        return self.identities * self.per_identity

    def shape(self) -> dict:
        shape = asdict(self)
        del shape["name"], shape["priority"]
        return shape


PAPER = [
    TripletConfig("casia-b 8x16 c128 p64", 8, 16, 128, 64),
    TripletConfig("32x8 c128 p64", 32, 8, 128, 64),
    TripletConfig("oumvlp 32x8 c256 p64", 32, 8, 256, 64),
    # gaitmask_oumvlp's batch: 512 samples, the tiled Triton path (over SINGLE_TILE_BATCH)
    TripletConfig("oumvlp GaitMask 32x16 c256 p64", 32, 16, 256, 64, priority=h.PRIORITY["oumvlp"]),
]
SMOKE = [TripletConfig("tiny 3x2 c8 p4", 3, 2, 8, 4)]


def shrink(config: TripletConfig) -> TripletConfig:
    return replace(config, identities=3, per_identity=2, c=8, parts=4)


def cases(mode: h.Mode) -> list[h.Case]:
    return h.op_cases(mode.pick(PAPER, SMOKE, shrink), PROVIDERS, compiled_priority=h.PRIORITY["compiled-op"])


class TripletBench(h.OpBench):
    op = OP
    autocast = False

    def inputs(self, bench, config, seed):
        device = bench.device
        gen = torch.Generator(device=device).manual_seed(seed)
        parts_first = torch.randn(config.parts, config.n, config.c, generator=gen, device=device)
        labels = torch.arange(config.identities, device=device).repeat_interleave(config.per_identity)
        labels = labels[torch.randperm(config.n, generator=gen, device=device)]  # any order (ranked in-kernel)
        return {
            "embeddings": parts_first.permute(1, 2, 0).detach().requires_grad_(),  # [n, c, p] view
            "labels": labels,
            "grad_out": torch.randn((), generator=gen, device=device),
        }

    def forward(self, bench, provider, config):
        def run(impl):
            return lambda i: triplet_loss(i["embeddings"], i["labels"], MARGIN, impl=impl)[0]

        if provider == "reference-compiled":
            return bench.compile(run("reference"), key=(OP, config.name, provider))
        return run("reference" if provider == "reference-eager" else provider)

    def work(self, bench, config, provider, pass_):
        n, k = config.n, config.per_identity
        gram = 2.0 * config.parts * n * n * config.c
        triplets = float(config.parts * n * k * (n - k))
        embedding_bytes = 4.0 * n * config.c * config.parts
        fwd = h.Work(gram + 3 * triplets, embedding_bytes, matrix="fp32")
        bwd = h.Work(2 * gram + triplets, 2 * embedding_bytes, matrix="fp32")
        return h.pass_work(pass_, fwd, bwd)


def test_triplet(benchmark, bench, case):
    h.run_op_case(benchmark, bench, TripletBench(), case)

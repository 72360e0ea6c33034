"""CPU: the band-aware PyTorch paths (``impl="torch"``) against the references, side by side.

    python -m bench.cpu_conv_ratio [--n 4] [--reps 5]

Forward + backward of each block at a CASIA-B-like shape scaled for a CPU (10 frames of
32 x 22, batch ``--n``), fp32, contiguous; median wall time over ``--reps`` (the two paths alternating) after one warm-up.
Prints one line per block: reference ms, torch ms, their ratio (torch / reference; < 1 is
faster). A measurement on a shared CPU, not a test: it asserts nothing about speed (it does
check that the two paths agree).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastgait.ops import band_height, gl_conv3d, mla_conv3d
from fastgait.ops.reverse_mask import draw_mask, rmb_conv3d
from fastgait.testing import relative_error


def blocks(n, c_in, c_out, t, h, w):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, t, h, w, generator=gen)
    ws = [torch.randn(c_out, c_in, 3, 3, 3, generator=gen) / (27 * c_in) ** 0.5 for _ in range(3)]
    band = torch.randint(0, h - band_height(h, 0.4) + 1, (n,), generator=gen)
    unit, strip = draw_mask("unit", 0.5, h, w, generator=gen), draw_mask("band", 0.5, h, w, generator=gen)
    scales = torch.rand(2, 2, generator=gen)
    yield "MLA-A band", x, ws[:2], lambda impl, x, a, b: mla_conv3d(x, a, b, band, band_height(h, 0.4), impl=impl)
    yield "GL halving 3", x, ws[:2], lambda impl, x, a, b: gl_conv3d(x, a, b, 3, impl=impl)
    yield "GL-fm halving 3", x, ws[:2], lambda impl, x, a, b: gl_conv3d(x, a, b, 3, True, impl=impl)
    yield "RMFE unit", x, ws[:1], lambda impl, x, a: rmb_conv3d(x, None, [a], scales[:1], unit, impl=impl)
    yield "Inception-RMB unit", x, ws, lambda impl, x, g, a, b: rmb_conv3d(x, g, [a, b], scales, unit, impl=impl)
    yield "Inception-RMB band", x, ws, lambda impl, x, g, a, b: rmb_conv3d(x, g, [a, b], scales, strip, impl=impl)
    yield "Inception-RMB unit concat", x, ws, lambda impl, x, g, a, b: rmb_conv3d(
        x, g, [a, b], scales, unit, "concat", impl=impl)


def fwd_bwd(fn, impl, x, weights):
    leaves = [x.detach().requires_grad_()] + [w.detach().requires_grad_() for w in weights]
    y = fn(impl, *leaves)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    return [y.detach(), *grads]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--c-in", type=int, default=16)
    parser.add_argument("--c-out", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    shape = (args.n, args.c_in, args.c_out, 10, 32, 22)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; n={args.n}, {args.c_in}->{args.c_out}, "
          f"10x32x22, fp32, fwd+bwd, median of {args.reps}")
    print(f"{'block':28s} {'reference ms':>13s} {'torch ms':>9s} {'ratio':>6s} {'rel err':>8s}")
    for name, x, weights, fn in blocks(*shape):
        outs = {impl: fwd_bwd(fn, impl, x, weights) for impl in ("reference", "torch")}  # warm-up
        samples = {"reference": [], "torch": []}
        for _ in range(args.reps):  # alternate, so drift in a shared machine's load hits both alike
            for impl in ("reference", "torch"):
                start = time.perf_counter()
                fwd_bwd(fn, impl, x, weights)
                samples[impl].append(time.perf_counter() - start)
        times = {impl: statistics.median(values) * 1e3 for impl, values in samples.items()}
        error = max(relative_error(a, b) for a, b in zip(outs["torch"], outs["reference"]))
        assert error < 1e-4, f"{name}: torch path disagrees with the reference ({error:.1e})"
        print(f"{name:28s} {times['reference']:13.1f} {times['torch']:9.1f} {times['torch'] / times['reference']:6.2f} "
              f"{error:8.1e}", flush=True)


if __name__ == "__main__":
    main()

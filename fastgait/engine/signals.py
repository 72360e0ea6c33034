"""Signals and loader workers: workers leave SIGINT/SIGTERM to the main process.

torchrun (``os.killpg``), Slurm and a terminal's Ctrl-C signal the whole process group. torch's
loader workers install a C handler that dies on SIGTERM, and the main process then fails with
"DataLoader worker ... is killed by signal". With :class:`IgnoreStopSignals` as their init, the
workers ignore both; the main process decides (a checkpoint at a step boundary) and the workers
end with it.
"""
from __future__ import annotations

import signal


class IgnoreStopSignals:
    """A loader ``worker_init_fn``: ignore SIGINT/SIGTERM, then call the loader's own init (if any)."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def protect_workers(loader):
    """Give ``loader``'s workers :class:`IgnoreStopSignals` (before its first ``iter``)."""
    if getattr(loader, "num_workers", 0) > 0 and not isinstance(loader.worker_init_fn, IgnoreStopSignals):
        loader.worker_init_fn = IgnoreStopSignals(loader.worker_init_fn)
    return loader

"""A process pool with a progress bar, shared by the pretreatment and the synthetic generator."""
from __future__ import annotations

import contextlib
import multiprocessing
from typing import Callable, Iterator, Sequence, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


def parallel_map(
    fn: Callable[[Job], Result],
    jobs: Sequence[Job],
    workers: int,
    *,
    desc: str,
    unit: str,
    progress: bool = True,
) -> Iterator[Result]:
    """``fn`` over ``jobs`` in ``workers`` processes (in this process when ``workers <= 1``), in completion order.

    ``fn`` must be a module-level function (it is pickled to the workers).
    """
    from tqdm import tqdm

    workers = max(1, min(workers, len(jobs)))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(fn, jobs)
        else:
            results = stack.enter_context(multiprocessing.get_context().Pool(workers)).imap_unordered(fn, jobs)
        bar = stack.enter_context(tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress))
        for result in results:
            bar.update()
            yield result

"""Choosing among interchangeable implementations by timing them: a small, generic chooser.

A :class:`Chooser` maps a *key* (whatever decides speed: shapes, dtypes, layout, options, the
GPU's name) to one of its *candidates*. On a miss it runs every candidate on the real inputs
(one untimed call that also compiles, then ``repeats`` calls timed with CUDA events), takes
the fastest by median, keeps it in a dict for the rest of the process and logs it once (logger
``fastgait.ops._autotune``, INFO, with the timings). Candidates must be free of side effects:
their outputs are discarded, and the caller then runs the chosen one for the real call.

It never times where timing is impossible or unsafe; it answers ``fallback`` there, without
caching it (a later call that can time still does):
- off CUDA (CPU tensors under the Triton interpreter, the compile gate's fake tensors);
- while a CUDA graph is being captured (``torch.cuda.is_current_stream_capturing()``): a
  choice made before the capture is used, else ``fallback``.

``env_var`` (e.g. ``FASTGAIT_CONV_DESIGN``) overrides the choice for every key: a candidate's
name forces it, ``"auto"`` (or unset) chooses; any other value raises one ``ValueError`` line
naming the valid values.

Optional persistence: with ``$FASTGAIT_CACHE`` set, a chooser with a ``store`` name keeps its
timed choices in ``$FASTGAIT_CACHE/autotune/<store>.json`` (written atomically: a temporary
file, then ``os.replace``), under a context of the torch and Triton versions and ``context``
(e.g. a digest of the kernels' sources); the key holds the GPU's name. Choices from another
context are ignored. Concurrent writers (DDP ranks) never leave a torn file, but one may drop
another's new entries: those are timed again in the next process.

:func:`usage` collects the choices a block of code used (benchmarks record them).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
Timer = Callable[[Callable[[], Any], torch.device], float]


@dataclass(frozen=True)
class Choice:
    """One resolution: the ``key``, the ``choice``, per-candidate median ``timings_ms`` (None when not
    timed) and ``how``: ``"timed"``, ``"cached"`` (from ``$FASTGAIT_CACHE``), ``"env"`` (the override),
    ``"not on CUDA"`` or ``"CUDA graph capture"`` (the fallback, untimed)."""

    key: tuple
    choice: str
    timings_ms: Optional[dict] = None
    how: str = "timed"

    def as_dict(self) -> dict:
        return asdict(self)


def cuda_median_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """The median of ``repeats`` CUDA-event timings of ``fn()`` on the current stream, after one
    untimed call (which also compiles). Outputs are discarded."""
    with torch.cuda.device(device):
        fn()
        stream = torch.cuda.current_stream()
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            events.append((start, end))
        end.synchronize()
        times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def why_not_timed(device: torch.device) -> Optional[str]:
    """Why candidates cannot be timed on ``device`` now (None: they can)."""
    if device.type != "cuda":
        return "not on CUDA"
    if torch.cuda.is_current_stream_capturing():
        return "CUDA graph capture"
    return None


_collectors: list[dict] = []


@contextlib.contextmanager
def usage() -> Iterator[dict]:
    """``with usage() as used:``: ``used`` maps each key resolved inside the block to its :class:`Choice`."""
    used: dict = {}
    _collectors.append(used)
    try:
        yield used
    finally:
        _collectors.remove(used)


def _note(choice: Choice) -> None:
    for used in _collectors:
        used[choice.key] = choice


class Chooser:
    """Per key, the fastest of ``candidates`` (see the module docstring).

    ``timer(fn, device) -> ms`` and ``why_not_timed(device) -> reason or None`` are injectable
    (tests use a fake timer); ``name`` labels the log lines.
    """

    def __init__(
        self,
        name: str,
        candidates: Sequence[str],
        fallback: str,
        *,
        env_var: Optional[str] = None,
        timer: Timer = cuda_median_ms,
        why_not_timed: Callable[[torch.device], Optional[str]] = why_not_timed,
        store: Optional[str] = None,
        context: Callable[[], str] = lambda: "",
    ):
        if fallback not in candidates:
            raise ValueError(f"{name}: fallback {fallback!r} is not one of {tuple(candidates)}")
        self.name = name
        self.candidates = tuple(candidates)
        self.fallback = fallback
        self.env_var = env_var
        self.timer = timer
        self.why_not_timed = why_not_timed
        self.store = store
        self.context = context
        self._cache: dict[tuple, Choice] = {}
        self._loaded = False

    @property
    def values(self) -> tuple[str, ...]:
        """What a caller (or ``env_var``) may ask for: ``"auto"`` or a candidate."""
        return (AUTO,) + self.candidates

    def override(self) -> Optional[str]:
        """The candidate ``env_var`` forces, or None (unset, empty or ``"auto"``)."""
        if self.env_var is None:
            return None
        value = os.environ.get(self.env_var, "").strip()
        if value in ("", AUTO):
            return None
        if value not in self.candidates:
            raise ValueError(f"{self.env_var}={value!r}: must be one of {', '.join(self.values)}")
        return value

    def choices(self) -> dict[tuple, Choice]:
        """The choices made so far in this process (timed, or read from the store)."""
        return dict(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._loaded = False

    def choose(self, key: tuple, run: Callable[[str], Any], device: torch.device) -> str:
        """The candidate for ``key``; on a miss where timing is possible, times ``run(candidate)``
        for each candidate (outputs discarded) and keeps the fastest."""
        forced = self.override()
        if forced is not None:
            return self._used(Choice(key, forced, None, "env"))
        known = self._cache.get(key)
        if known is None and self.store is not None and not self._loaded:
            self._load()
            known = self._cache.get(key)
        if known is not None:
            return self._used(known)
        reason = self.why_not_timed(device)
        if reason is not None:
            return self._used(Choice(key, self.fallback, None, reason))
        timings = {}
        for candidate in self.candidates:
            try:
                timings[candidate] = float(self.timer(lambda c=candidate: run(c), device))
            except Exception as error:  # noqa: BLE001 - a candidate that fails here is not chosen
                if candidate == self.fallback:
                    raise
                log.warning("%s %s: %s failed while timing, not chosen: %s: %s", self.name, _describe(key),
                            candidate, type(error).__name__, error)
                timings[candidate] = math.inf
        best = min(self.candidates, key=lambda c: timings[c])
        choice = Choice(key, best, timings, "timed")
        self._cache[key] = choice
        log.info("%s %s: %s (%s)", self.name, _describe(key), best,
                 ", ".join(f"{c} {t:.3f} ms" for c, t in timings.items()))
        if self.store is not None:
            self._save(choice)
        return self._used(choice)

    def _used(self, choice: Choice) -> str:
        _note(choice)
        return choice.choice

    # -- persistence ---------------------------------------------------------------------

    def _path(self) -> Optional[Path]:
        base = os.environ.get("FASTGAIT_CACHE")
        return Path(base) / "autotune" / f"{self.store}.json" if base and self.store else None

    def _full_context(self) -> str:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        return json.dumps([torch.__version__, triton_version, self.context()])

    def _read(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _load(self) -> None:
        self._loaded = True
        path = self._path()
        if path is None:
            return
        entries = self._read(path).get(self._full_context(), {})
        for text, entry in entries.items():
            try:
                key = _tuple(json.loads(text))
                if entry["choice"] in self.candidates:
                    self._cache.setdefault(key, Choice(key, entry["choice"], entry.get("timings_ms"), "cached"))
            except (ValueError, KeyError, TypeError):
                continue

    def _save(self, choice: Choice) -> None:
        path = self._path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read(path)
            context = self._full_context()
            data = {context: data.get(context, {})}  # choices of other versions are dropped
            data[context][json.dumps(choice.key)] = {"choice": choice.choice, "timings_ms": choice.timings_ms}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # atomic: readers see the old file or the new one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            log.warning("%s: could not write %s: %s", self.name, path, error)


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _describe(key: tuple) -> str:
    return " ".join(str(part) for part in key)

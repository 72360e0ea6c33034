"""``pytest bench --benchmark``: the option, the session, the order of the cases.

``--benchmark`` is this project's option (pytest-benchmark's own all start ``--benchmark-``;
none is ``--benchmark``, and pytest matches options exactly, never by prefix). Without it,
``bench/`` is a smoke at tiny shapes, part of the default ``python -m pytest`` run.

Each bench module defines ``cases(mode) -> list[Case]``; a test that takes ``case`` is
parametrized with them. With ``--benchmark`` the cases run in priority order
(``_harness.PRIORITY``), so a time budget cuts what matters least.
"""
from __future__ import annotations

import contextlib
import datetime
import sys
from pathlib import Path

import pytest
import torch

from bench import _harness
from bench._harness import Bench, Mode, Recorder

BENCH_DIR = Path(__file__).resolve().parent
SESSION = pytest.StashKey[Bench]()


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="fastgait: measure bench/ at the papers' shapes on a GPU and write bench/results/<date>-<gpu>.json "
        "(on a CPU: a dry run of the same path at tiny shapes). Without it bench/ is a quick smoke.",
    )


def pytest_report_header(config):
    banner = Mode.from_config(config).banner
    return [banner] if banner else []


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.module.cases(Mode.from_config(metafunc.config))
        metafunc.parametrize("case", cases, ids=[case.id for case in cases])


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--benchmark"):
        return

    def order(item):
        in_bench = BENCH_DIR in Path(item.path).resolve().parents
        case = item.callspec.params.get("case") if hasattr(item, "callspec") else None
        return in_bench, case.priority if case is not None else 0

    items.sort(key=order)  # stable: within a priority, the order of the files


@contextlib.contextmanager
def _recompile_limit(limit: int = 64):
    """Every config of an op recompiles the same code (static shapes): allow it, or dynamo
    would silently fall back to eager after 8 and the "compiled" rows would not be."""
    import torch._dynamo

    names = [name for name in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, name)]
    previous = {name: getattr(torch._dynamo.config, name) for name in names}
    for name in names:
        setattr(torch._dynamo.config, name, max(limit, previous[name]))
    try:
        yield
    finally:
        for name in names:
            setattr(torch._dynamo.config, name, previous[name])


@pytest.fixture(scope="session")
def bench(request):
    mode = Mode.from_config(request.config)
    if mode.device.type == "cuda":  # the trainer's settings
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = _harness.environment(mode.device)
    run = {
        "id": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "mode": mode.kind,
        "compile_backend": mode.compile_backend,
    }
    session = Bench(mode, Recorder(mode, _harness.results_path(mode, env), run, env))
    request.config.stash[SESSION] = session
    with _recompile_limit():
        yield session


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, config):
    session = config.stash.get(SESSION, None)
    if session is None:
        return
    rows = session.recorder.rows
    where = session.recorder.path or "not written (smoke and dry-run rows are no measurements)"
    terminalreporter.write_sep("-", f"fastgait bench: {len(rows)} rows recorded; results: {where}")
    if session.mode.banner:
        terminalreporter.write_sep("=", session.mode.banner, yellow=True, bold=True)

"""fastgait: fused-kernel GaitMask, ReverseMask and GaitGL for gait recognition.

Sub-packages: ``fastgait.ops`` (fused ops with their references), ``fastgait.nn`` (modules),
``fastgait.models``, ``fastgait.data``, ``fastgait.evaluation``, ``fastgait.kernels`` (Triton).
"""
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _map_source_dir(subpackage: str, folder: str) -> None:
    """Make ``fastgait.<subpackage>`` importable when running from a source checkout.

    An installed fastgait carries ``kernels/`` and ``configs/`` as sub-packages (setup.py maps
    them); a checkout on ``PYTHONPATH`` has them beside the package instead.
    """
    name = f"{__name__}.{subpackage}"
    if name in _sys.modules:
        return
    root = _Path(__file__).resolve().parent.parent / folder
    init = root / "__init__.py"
    try:
        installed = _ilu.find_spec(name) is not None
    except (ImportError, ValueError):
        installed = False
    if installed or not init.exists():
        return
    spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
    module = _ilu.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(_sys.modules[__name__], subpackage, module)


_map_source_dir("kernels", "kernels")
_map_source_dir("configs", "configs")

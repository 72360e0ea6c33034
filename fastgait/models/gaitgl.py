"""GaitGL, the baseline both mask methods build on (blocks.md §4, OpenGait's GaitGL)."""
from __future__ import annotations

from typing import Optional

from .network import GaitNet


def _gl(c_in, c_out, halving, fm_sign=False):
    return {"type": "gl", "in": c_in, "out": c_out, "halving": halving, "fm_sign": fm_sign}


PRESETS = {
    "casia-b": {
        "stem": [{"in": 1, "out": 32}, {"in": 32, "out": 32, "kernel": (3, 1, 1), "stride": (3, 1, 1)}],
        "blocks": [_gl(32, 64, 3), {"type": "maxpool"}, _gl(64, 128, 3), _gl(128, 128, 3, fm_sign=True)],
        "embed_dim": 128,
    },
    "oumvlp": {
        "stem": [{"in": 1, "out": 32}, {"in": 32, "out": 32},
                 {"in": 32, "out": 32, "kernel": (3, 1, 1), "stride": (3, 1, 1)}],
        "blocks": [_gl(32, 64, 1), _gl(64, 64, 1), {"type": "maxpool"}, _gl(64, 128, 1), _gl(128, 128, 1),
                   _gl(128, 256, 1), _gl(256, 256, 1, fm_sign=True)],
        "embed_dim": 256,
    },
}


class GaitGL(GaitNet):
    """GaitGL for ``preset="casia-b" | "oumvlp"``; ``num_classes > 0`` adds its BN + CE head
    (about 3.1 M parameters for CASIA-B with 74 classes)."""

    def __init__(self, preset: str = "casia-b", num_classes: int = 0, embed_dim: Optional[int] = None,
                 impl: str = "auto", **kwargs):
        if preset not in PRESETS:
            raise ValueError(f"unknown GaitGL preset {preset!r}; choose one of {sorted(PRESETS)}")
        spec = PRESETS[preset]
        super().__init__(kwargs.pop("stem", spec["stem"]), kwargs.pop("blocks", spec["blocks"]),
                         embed_dim or spec["embed_dim"], num_classes=num_classes, impl=impl, **kwargs)

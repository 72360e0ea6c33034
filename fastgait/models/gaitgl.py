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
        "num_classes": 74,  # CASIA-B LT's training identities (OpenGait's class_num)
    },
    "oumvlp": {
        "stem": [{"in": 1, "out": 32}, {"in": 32, "out": 32},
                 {"in": 32, "out": 32, "kernel": (3, 1, 1), "stride": (3, 1, 1)}],
        "blocks": [_gl(32, 64, 1), _gl(64, 64, 1), {"type": "maxpool"}, _gl(64, 128, 1), _gl(128, 128, 1),
                   _gl(128, 256, 1), _gl(256, 256, 1, fm_sign=True)],
        "embed_dim": 256,
        "num_classes": 5153,
    },
}


class GaitGL(GaitNet):
    """GaitGL for ``preset="casia-b" | "oumvlp"``, with its classifier head as in the paper and
    OpenGait: ``num_classes`` defaults to the preset's training identities (74 for CASIA-B LT,
    about 3.1 M parameters; 5153 for OU-MVLP); ``num_classes=0`` drops the head.
    ``head="bnneck"`` (with ``bnneck={...}``) is OpenGait's SeparateBNNecks variant."""

    def __init__(self, preset: str = "casia-b", num_classes: Optional[int] = None, embed_dim: Optional[int] = None,
                 impl: str = "auto", **kwargs):
        if preset not in PRESETS:
            raise ValueError(f"unknown GaitGL preset {preset!r}; choose one of {sorted(PRESETS)}")
        spec = PRESETS[preset]
        num_classes = spec["num_classes"] if num_classes is None else num_classes
        super().__init__(kwargs.pop("stem", spec["stem"]), kwargs.pop("blocks", spec["blocks"]),
                         embed_dim or spec["embed_dim"], num_classes=num_classes, impl=impl, **kwargs)

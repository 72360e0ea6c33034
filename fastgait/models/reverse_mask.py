"""ReverseMaskNet: a simplified GaitGL whose blocks can be swapped (blocks.md §3.3)."""
from __future__ import annotations

from typing import Optional

from .network import GaitNet

BLOCK_TYPES = ("conv", "gl", "rmb_dropping", "rmb_scaling", "inception")
CHANNELS = {"casia-b": (32, 64, 128), "oumvlp": (64, 128, 256)}  # OUMVLP doubles every count
HALVING = {"casia-b": 3, "oumvlp": 1}  # GaitGL's strip count per dataset


def reverse_mask_blocks(block: str, channels: tuple[int, int, int], halving: int = 3, region: str = "unit",
                        ratio: float = 0.5, reg_prob: float = 1.0, regularizer: Optional[dict] = None) -> list[dict]:
    """Specs for ``block(c0->c1) -> maxpool -> block(c1->c2) -> block(c2->c2, last stage)``.

    The last stage concatenates along H where the block type does (GL's ``fm_sign``, Inception RMB).
    ``regularizer`` (e.g. ``{"type": "dropblock", "drop_prob": 0.1, "block_size": 5}``) is put before
    every block: the DropBlock / Scaling DropBlock baselines of the paper.
    """
    if block not in BLOCK_TYPES:
        raise ValueError(f"block must be one of {BLOCK_TYPES}, got {block!r}")
    c0, c1, c2 = channels
    stages = [(c0, c1, False), "maxpool", (c1, c2, False), (c2, c2, True)]
    specs = []
    for stage in stages:
        if stage == "maxpool":
            specs.append({"type": "maxpool"})
            continue
        c_in, c_out, last = stage
        if regularizer:
            specs.append(dict(regularizer))
        if block == "conv":
            specs.append({"type": "conv", "in": c_in, "out": c_out})
        elif block == "gl":
            specs.append({"type": "gl", "in": c_in, "out": c_out, "halving": halving, "fm_sign": last})
        elif block == "inception":
            specs.append({"type": "inception_rmb", "in": c_in, "out": c_out, "fuse": "concat" if last else "add",
                          "region": region, "ratio": ratio, "reg_prob": reg_prob})
        else:
            specs.append({"type": "rmb", "in": c_in, "out": c_out, "variant": block.split("_")[1],
                          "region": region, "ratio": ratio, "reg_prob": reg_prob})
    return specs


class ReverseMaskNet(GaitNet):
    """ReverseMask's network for ``preset="casia-b" | "oumvlp"`` with ``block`` one of
    ``conv`` (plain), ``gl`` (GaitGL block), ``rmb_dropping`` / ``rmb_scaling`` (Plain RMB),
    ``inception`` (Inception RMB). GeM p starts at 6.5 (learnable); one part per final row."""

    def __init__(self, preset: str = "casia-b", block: str = "inception", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, regularizer: Optional[dict] = None,
                 num_classes: int = 0, embed_dim: Optional[int] = None, impl: str = "auto", **kwargs):
        if preset not in CHANNELS:
            raise ValueError(f"unknown ReverseMaskNet preset {preset!r}; choose one of {sorted(CHANNELS)}")
        channels = tuple(kwargs.pop("channels", CHANNELS[preset]))
        stem = kwargs.pop("stem", [{"in": 1, "out": channels[0]},
                                   {"in": channels[0], "out": channels[0], "kernel": (3, 1, 1), "stride": (3, 1, 1)}])
        blocks = kwargs.pop("blocks", None) or reverse_mask_blocks(
            block, channels, HALVING[preset], region, ratio, reg_prob, regularizer)
        super().__init__(stem, blocks, embed_dim or channels[-1], num_classes=num_classes, impl=impl, **kwargs)

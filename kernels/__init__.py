"""Triton kernels of fastgait (installed as ``fastgait.kernels``).

Triton code only, one file per fused op. The launchers, checks, autograd and the
``torch.library`` registration live in ``fastgait.ops``.
"""

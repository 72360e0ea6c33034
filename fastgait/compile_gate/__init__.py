"""The compile gate: every Triton kernel launch the recipes make, compiled ahead of time for the
GPU targets without a GPU, with the installed Triton and with the GPU machines' Triton 3.6.0.

- ``capture``: runs each recipe's model on fake tensors with the launchers' GPU choices forced and
  records every ``kernel[grid](...)`` instead of launching it.
- ``worker``: compiles recorded launches with whichever Triton is importable (a subprocess).
- ``gate``: scenarios, compiles, verdicts. ``python -m pytest -k compile`` runs the gate's tests;
  ``python -m fastgait.compile_gate`` writes the kernel report (docs/KERNELS.md).
"""

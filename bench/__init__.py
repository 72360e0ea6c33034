"""fastgait's benchmarks: ``pytest bench --benchmark`` on a GPU (a smoke at tiny shapes without it).

Mirrors ``kernels/`` file for file (``test_mla.py``, ``test_gem.py``, ``test_triplet.py``), plus
whole training steps (``test_step.py``) and loader throughput (``test_data.py``).
``python -m bench.report`` turns ``bench/results/*.json`` into ``docs/PERFORMANCE.md``.
"""

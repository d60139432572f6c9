from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sam_hf",
    version="0.1.0",
    description="Sharpness-aware training (SAM, mSAM, SAMPa, Asynchronous SAM) as a one-flag change for Hugging Face Trainer",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sam_hf", "sam_hf.*"]),
    package_data={"sam_hf": ["recipes/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # Tested with torch 2.13, transformers 5.23, accelerate 1.15, datasets 5.2, evaluate 0.4.6, peft 0.21.
        "torch>=2.4,<3",
        "transformers>=5.0,<6",
        "accelerate>=1.10,<2",
        "datasets>=3.0,<6",
        "evaluate>=0.4.3,<0.5",
        "peft>=0.17,<1",
        "pyyaml>=6",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "scikit-learn>=1.3", "matplotlib>=3.7", "scipy"],
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        "trl": ["trl>=0.20"],
    },
    entry_points={"console_scripts": ["sam-hf=sam_hf.cli:main"]},
)

"""rlp_megatron: RLP (Reinforcement Learning Pretraining) as a Megatron-Core pretraining objective."""

from setuptools import find_packages, setup

setup(
    name="rlp_megatron",
    version="0.1.0",
    description="RLP (arXiv 2510.01265) as an alternative pretraining objective inside Megatron-Core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rlp_megatron", "rlp_megatron.*"]),
    python_requires=">=3.12",
    install_requires=[
        "megatron-core>=0.19,<0.20",  # its wheel ships megatron.training
        "torch>=2.13",
        "numpy",
        "sentencepiece",
        "psutil",  # checkpoint save
        "einops",
    ],
    extras_require={
        # GPU kernels; Megatron-Core falls back to (slower) paths without them. Never list PyPI's
        # `apex`: it is an unrelated web toolkit (NVIDIA apex comes from the NGC container).
        "gpu": ["transformer-engine[pytorch]", "mamba-ssm", "causal-conv1d"],
        "test": ["pytest", "tensorboard", "matplotlib"],
        "plot": ["matplotlib"],  # python -m rlp_megatron.plot
    },
    entry_points={"console_scripts": ["rlp-pretrain=rlp_megatron.train:main"]},
)

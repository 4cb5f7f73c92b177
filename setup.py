"""Packaging for e2etts_jax: end-to-end training of a discrete-token LLM-based TTS system in JAX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.4",
    "orbax-checkpoint>=0.12.8,<0.14",
    "grain>=0.2.18,<0.4",
    "array-record>=0.8.1",
    "librosa>=0.11,<0.13",
    "soundfile>=0.13",
    "sentencepiece>=0.2.0",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "jiwer>=4.0,<5",
    "numpy>=1.26",
    "threadpoolctl>=3.1",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
]

EXTRAS = {
    "tpu": ["jax[tpu]>=0.10.2"],
    "cuda": ["jax[cuda12]>=0.10.2"],
    "eval": ["pocketsphinx>=5.0"],
    "dev": ["pytest>=8", "pytest-xdist>=3.5", "threadpoolctl>=3.1", "nbclient>=0.10", "nbformat>=5.10",
            "ipykernel>=6.29", "pocketsphinx>=5.0"],
}

setup(
    name="e2etts_jax",
    version="0.1.0",
    description="End-to-end training of a discrete-token LLM-based TTS system (tokenizer, LLM, flow matching, "
                "reward model) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["e2etts_jax", "e2etts_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "e2etts-corpus=e2etts_jax.cli.corpus:run",
            "e2etts-prepare=e2etts_jax.cli.prepare:run",
            "e2etts-train=e2etts_jax.cli.train:run",
            "e2etts-synthesize=e2etts_jax.cli.synthesize:run",
            "e2etts-eval=e2etts_jax.cli.evaluate:run",
            "e2etts-bench=e2etts_jax.cli.bench:run",
            "e2etts-ablate=e2etts_jax.cli.ablate:run",
            "e2etts-diagnose=e2etts_jax.cli.diagnose:run",
        ]
    },
)

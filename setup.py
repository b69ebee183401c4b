"""Installs `afl`: analytic (gradient-free) personalized federated learning in JAX."""

import setuptools

setuptools.setup(
    name="afl",
    version="0.1.0",
    description=(
        "FedACnnL / pFedACnnL and gradient, zeroth-order and personalized "
        "FL baselines on shared Flax models, in JAX."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=[
            "afl",
            "afl.*",
            "baselines",
            "baselines.*",
            "experiments",
            "experiments.*",
            "launch",
            "launch.*",
        ]
    ),
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "numpy>=1.26,<3",
        "scikit-learn>=1.5,<2",
        "absl-py>=2.1,<3",
        "ml_collections>=1.0,<2",
        "matplotlib>=3.8,<4",
        # --secure_sum: X25519 + HKDF key agreement, Shamir secret sharing.
        "cryptography>=42,<52",
        "pycryptodome>=3.20,<5",
        # JAX's compilation cache keeps its size bound with it.
        "filelock>=3.12,<5",
        # Differential privacy's accountant and calibration (afl/privacy.py).
        "dp-accounting>=0.4,<0.7",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        "tfds": ["tensorflow-datasets>=4.9,<5", "tensorflow-cpu>=2.16,<3"],
    },
)

"""jaxopt_study: how optimizers behave under sparse, non-stationary LM gradients."""
import setuptools

setuptools.setup(
    name="jaxopt_study",
    version="0.1.0",
    description=(
        "A JAX/Flax study of optimizers (SGD-momentum, AdamW, Adafactor, Lion, SignSGD) "
        "under sparse and non-stationary transformer gradients."
    ),
    packages=setuptools.find_packages(include=["jaxopt_study", "jaxopt_study.*"]),
    python_requires=">=3.11",
    # No upper pins: CPU machines get jax 0.10.x, the GPU image has jax 0.11.2 / flax 0.12 /
    # optax 0.2.8, and both must work.
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml_collections>=0.1.1",
        "clu>=0.0.12",
        "tensorboard>=2.16",  # to view the runs, and to read event files in tests
        "tensorboardX>=2.6",  # event files where TensorFlow (needed by CLU's writer) is absent
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "pandas>=2.0",
        "scipy>=1.11",  # Student-t quantiles of the study's intervals (jax needs it too)
        "pyarrow>=14",  # the study archive's per-step series (parquet); datasets needs it too
        "safetensors>=0.4",  # Hugging Face export (export_hf.py); small, no torch needed
        "tqdm>=4.66",
    ],
    extras_require={
        # TensorFlow makes CLU use its own SummaryWriter; without it we fall back to tensorboardX.
        "tf": ["tensorflow-cpu>=2.16"],
        "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    },
)

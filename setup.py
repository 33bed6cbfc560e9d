"""Installs nfnets_jax: Normalizer-Free Networks and AGC for today's JAX."""
import setuptools

setuptools.setup(
    name="nfnets_jax",
    version="0.1.0",
    description="Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) and "
    "Adaptive Gradient Clipping in JAX/Haiku.",
    packages=setuptools.find_packages(include=["nfnets_jax", "nfnets_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "dm-haiku==0.0.17",
        "optax==0.2.8",
        "chex==0.1.92",
        "numpy>=2.0,<3",
        # ml_dtypes 0.7.0 took 0.9 s to import (0.01 s for 0.5.4), in every
        # process that imports JAX.
        "ml-dtypes>=0.5.4,<0.7",
        "ml-collections==1.1.0",
        "tensorflow-datasets==4.9.10",
        "grain==0.2.18",
        "orbax-checkpoint==0.12.8",
        "scikit-learn>=1.5",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX==2.6.5",
        "flatbuffers==25.12.19",  # jax.export serialization
        "safetensors==0.8.0",  # timm .safetensors checkpoints
        "pillow>=10",  # nfnets-predict reads images
        "simplejpeg==1.9.0",  # libjpeg-turbo: JPEGs as PIL reads them, quicker
        "scipy>=1.13",  # sparse bicubic resampling of the input pipeline
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "torch==2.14.1",
                 "torchvision==0.29.1", "timm>=1.0", "portpicker>=1.6",
                 "dill>=0.3.8", "pytest-xdist>=3.5", "filelock>=3.12",
                 # AGC's Flax and Equinox layouts are tested with them.
                 "flax==0.12.8", "equinox==0.13.8"],
    },
    entry_points={
        "console_scripts": ["nfnets-train=nfnets_jax.cli.train:main",
                            "nfnets-predict=nfnets_jax.cli.predict:main",
                            "nfnets-convert=nfnets_jax.cli.convert:main",
                            "nfnets-plan=nfnets_jax.cli.plan:main"],
    },
)

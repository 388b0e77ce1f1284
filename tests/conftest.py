"""Every test runs on 8 simulated CPU devices, so sharded layouts are exercised on a laptop."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny test models run in milliseconds but take seconds to compile with full LLVM optimisation:
# tests compile fast instead (the computation XLA is given is the same).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()

# The two xdist workers may both describe TPU topologies (test_compile, test_multislice), and
# libtpu refuses a second process on the machine by default. Nothing here runs on a TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (must come after the flags above)
import pytest  # noqa: E402

# No persistent compilation cache in tests (the CLIs use one): a full session with it enabled
# aborted once inside XLA (jax 0.10.2, CPU) while the same test passed alone; the cause is not
# pinned down, and a test should not depend on what an earlier one cached anyway.
os.environ["VIDIT_XLA_CACHE"] = ""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (minutes); skip locally with -m 'not slow'")


# The files that take longest (minutes each on 2 cores, mostly compiling end-to-end runs),
# longest first. scripts/test.sh hands whole files to 2 workers in collection order
# (--dist loadfile --no-loadscope-reorder), so starting these first keeps one long file from
# running alone at the end while the other worker idles.
LONGEST_FILES = ("test_train.py", "test_latent.py", "test_preemption.py", "test_multihost.py",
                 "test_wan.py", "test_cloud.py", "test_compile.py", "test_buckets.py",
                 "test_text_conditioning.py", "test_sweep.py", "test_hlo_cost.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps test order


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
    return jax.devices()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny moving_digits build (64 train / 16 validation clips, as every ':smoke' config
    asks for) shared by every test of the session."""
    from data_pipelines import moving_digits
    path = tmp_path_factory.mktemp("tfds")
    moving_digits.load_builder(str(path), num_train=64, num_validation=16)
    return str(path)


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator for this test process (one per xdist worker), with every client vidit uses
    pointed at it; stopped by its pid at the end of the session."""
    import logging
    from tests.gcs_emulator import Emulator
    emulator = Emulator(buckets=("bucket",))
    saved = {k: os.environ.get(k) for k in emulator.environment()}
    os.environ.update(emulator.environment())
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # the emulator refuses gcsfs's moveTo
    yield emulator
    emulator.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket_dir(gcs, request):
    """gs://bucket/<this test's name>: a fresh prefix per test (names with [] are globs there)."""
    import re
    from etils import epath
    root = epath.Path("gs://bucket/" + re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name))
    yield root
    if root.exists():
        root.rmtree()

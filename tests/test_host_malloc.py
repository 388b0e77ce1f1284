"""The glibc tuning in vidit.host_malloc is applied, and can be turned off."""
import os
import subprocess
import sys

from vidit import host_malloc


def test_tune_accepted_by_glibc():
    # Linux CI runs on glibc: every mallopt call must be accepted (returns 1).
    assert host_malloc.tune() is True


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("VIDIT_MALLOC_TUNING", "0")
    assert host_malloc.tune() is False


def test_import_vidit_does_not_start_jax():
    # The tuning must run before JAX creates its thread pools, so `import vidit` may not import jax.
    code = "import sys, vidit; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ)).stdout.strip()
    assert out == "False"

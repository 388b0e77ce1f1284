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


def test_a_library_import_leaves_the_allocator_alone():
    # The tuning changes the whole process: importing vidit, even its trainer, must not apply it
    # (host_malloc is not even imported); only a command's entry point does.
    code = ("import sys, vidit, vidit.train, vidit.sample, vidit.run; "
            "print('vidit.host_malloc' in sys.modules, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ)).stdout.split()
    assert out == ["False", "True"]


def test_command_entry_point_tunes_before_flags_and_main(monkeypatch):
    from absl import app
    from vidit import cli
    calls = []
    monkeypatch.setattr(host_malloc, "tune", lambda: calls.append("tune"))
    monkeypatch.setattr(app, "run", lambda main: calls.append("run"))
    cli.run(lambda argv: None, lambda: calls.append("flags"))
    assert calls == ["tune", "flags", "run"]

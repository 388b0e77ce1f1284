"""Runs `uv pip install ARGS...` into this interpreter's environment with pip's index settings.

    .venv/bin/python scripts/uv_install.py -e ".[video]"

uv reads no pip.conf, so a machine that installs from a mirror, a local wheel folder or with
constraints (pip.conf files, PIP_* variables) would otherwise resolve elsewhere than pip does.
This reads pip's effective settings (`pip config list`, whose [global] and [install] values
have the config files' precedence applied; PIP_* variables override both, as in pip) and
passes the ones that choose packages to uv. Like pip, uv then takes the best version over all
indexes (--index-strategy unsafe-best-match), not the first index's. Exits with uv's status.
"""
import ast
import os
import subprocess
import sys

# pip setting -> uv pip install flag, for settings that choose where packages come from.
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
SECTIONS = ("global", "install", ":env:")  # as pip install applies them: a later one overrides


def pip_settings() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or section not in SECTIONS:
            continue
        rank = SECTIONS.index(section)
        if key not in found or rank >= found[key][0]:
            found[key] = (rank, ast.literal_eval(value))
    return {key: value for key, (_, value) in found.items()}


def uv_command(settings: dict[str, str], args: list[str]) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable,
           "--index-strategy", "unsafe-best-match"]
    for key, flag in FLAGS.items():
        for value in settings.get(key, "").split():
            cmd += [flag, value]
    if settings.get("no-cache-dir", "").lower() in ("1", "true", "yes", "on"):
        cmd.append("--no-cache")
    env = dict(os.environ)
    if settings.get("cert"):  # pip's CA bundle, for indexes behind a private CA
        env.setdefault("SSL_CERT_FILE", settings["cert"])
    return cmd + args, env


def main():
    cmd, env = uv_command(pip_settings(), sys.argv[1:])
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()

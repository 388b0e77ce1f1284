"""What every vidit command does: `run` is the entry point of `python -m vidit.X` and of the
console script `vidit-X`; `setup` starts a command's work."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def run(main: Callable, define_flags: Callable) -> None:
    """Tunes the process allocator (vidit/host_malloc.py) before JAX starts its threads, defines
    the command's flags and runs `main` under absl."""
    from absl import app
    from vidit import host_malloc
    host_malloc.tune()
    for value in _flag_values(sys.argv, "config"):
        make_importable(value)
    define_flags()
    app.run(main)


def make_importable(config: str) -> None:
    """Lets a config file import its sibling configs (`from configs import quickstart`) from
    any current folder: the folder above the config's package (the checkout, for configs/)
    joins sys.path. `config` is a path with an optional ':variant'."""
    folder = os.path.dirname(os.path.abspath(config.split(":", 1)[0]))
    while os.path.exists(os.path.join(folder, "__init__.py")):
        folder = os.path.dirname(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _flag_values(argv: list, name: str) -> list:
    """Values of --name X and --name=X in argv."""
    out = []
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            out.append(arg.split("=", 1)[1])
    return out


def setup(compilation_cache: bool = True, multi_host: bool = True) -> None:
    """Quiet library logs, vidit's own at INFO, a persistent XLA compilation cache, and joining
    the other processes of a multi-host job (vidit/distributed.py).

    The cache (~/.cache/vidit/xla, or $VIDIT_XLA_CACHE; '' disables it) makes a re-run or a resume
    of the same config skip compilation, which on CPU is often longer than a short run itself.
    """
    from absl import logging as absl_logging
    import jax

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax, Grain and TFDS are chatty at INFO
    log = logging.getLogger("vidit")  # vidit's own messages keep INFO, on their own handler
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    cache = os.environ.get("VIDIT_XLA_CACHE", os.path.expanduser("~/.cache/vidit/xla"))
    if compilation_cache and cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if multi_host:
        from vidit import distributed
        distributed.initialize()

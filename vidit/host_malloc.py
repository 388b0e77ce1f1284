"""Keep glibc from handing freed activation memory back to the OS after every XLA op on CPU.

XLA's CPU runtime allocates and frees each step's buffers through malloc. With glibc's defaults
every worker thread gets its own arena whose top is trimmed (and later faulted back in page by
page) as soon as it is freed, so small models spend much of their time in page faults. One arena
that keeps its memory removes most of them (docs/speed has the measured effect). It changes the
whole process, so a library import never applies it: the command-line entry points do
(vidit/cli.py), and so do the benchmarks, before JAX starts its threads.
`VIDIT_MALLOC_TUNING=0` turns it off. A no-op off glibc.
"""
import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def tune() -> bool:
    """Apply the settings; True if glibc accepted them all."""
    if os.environ.get("VIDIT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    settings = {_M_ARENA_MAX: 1,  # worker threads share the main heap ...
                _M_TRIM_THRESHOLD: 1 << 30,  # ... which keeps up to 1 GiB of freed memory
                _M_TOP_PAD: 256 << 20,  # grows in 256 MiB steps
                _M_MMAP_THRESHOLD: 32 << 20}  # and serves buffers under 32 MiB itself
    return all(mallopt(key, value) == 1 for key, value in settings.items())

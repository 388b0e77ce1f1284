#!/usr/bin/env bash
# Installs vidit with its test extras and runs the test suite on 8 simulated CPU devices.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` to skip end-to-end runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh  # the project's .venv (created on the first run), or $VIDIT_PYTHON
source scripts/install.sh
install_vidit test,video,tpu  # with uv, or pip (scripts/install.sh)
export JAX_PLATFORMS=cpu
# Two worker processes (pytest-xdist), whole files per worker so module-level compile caches
# are shared (about 1.7x faster than one process on 2 cores), the longest files first
# (tests/conftest.py: LONGEST_FILES). VIDIT_TEST_WORKERS=0 runs in
# this process; a later -n in "$@" overrides too. A worker that dies (a native crash) fails the
# run at once and names its test: pytest-xdist can wait forever for a replacement worker under
# --dist loadfile (pytest-dev/pytest-xdist#784).
"$PYTHON" -m pytest tests -n "${VIDIT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
    --max-worker-restart=0 "$@"

#!/usr/bin/env bash
# Installs vidit with its test extras and runs the test suite on 8 simulated CPU devices.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` to skip end-to-end runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test,video,tpu]"
export JAX_PLATFORMS=cpu
python3 -m pytest tests "$@"

#!/usr/bin/env bash
# Installs vidit and trains the quickstart config on the embedded moving-digits dataset (CPU),
# then writes sample videos to runs/quickstart/samples/. Training is 4800 steps of 4-frame clips:
# 10 min 33 s on 2 CPU cores from a fresh venv, install and dataset build included (2026-12-01).
# Everything goes into the project's own virtual environment, .venv (created on the first run,
# reused after; systems under PEP 668 refuse pip into their Python). VIDIT_PYTHON=... uses
# another interpreter's environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[video]"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WORKDIR="${WORKDIR:-runs/quickstart}"
"$PYTHON" -m vidit.train --config configs/quickstart.py --workdir "$WORKDIR" "$@"
echo "samples: $(ls "$WORKDIR"/samples/*.gif | tail -n 1) (and .mp4)"

#!/usr/bin/env bash
# Installs vidit and trains the quickstart config on the embedded moving-digits dataset (CPU),
# writes sample videos to runs/quickstart/samples/, scores a quick batch of samples and prints
# a summary with the next commands to try. Time and sample quality: docs/quickstart.
# Everything goes into the project's own virtual environment, .venv (created on the first run,
# reused after; systems under PEP 668 refuse pip into their Python). VIDIT_PYTHON=... uses
# another interpreter's environment instead. QUICKSTART_EVAL=0 skips the quick evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
source scripts/venv.sh
source scripts/install.sh
install_vidit video  # with uv, or pip (scripts/install.sh)
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WORKDIR="${WORKDIR:-runs/quickstart}"
"$PYTHON" -m vidit.train --config configs/quickstart.py --workdir "$WORKDIR" "$@"
if [ "${QUICKSTART_EVAL:-1}" != 0 ]; then
    # 100 samples scored by a frame classifier trained for 600 steps (about 20 s; cached): a
    # quick check, not the docs' 500-sample, 3000-step-classifier numbers.
    "$PYTHON" -m vidit.evaluate --workdir "$WORKDIR" --num 100 --classifier_steps 600 \
        --out "$WORKDIR/eval_quick" > "$WORKDIR/eval_quick.log" 2>&1 \
        || echo "(the quick evaluation failed: see $WORKDIR/eval_quick.log)"
fi
"$PYTHON" -m vidit.quickstart_summary --workdir "$WORKDIR" --started "$started"

#!/usr/bin/env bash
# Runs scripts/quickstart.sh from a fresh clone of this checkout under a Python that refuses
# `pip install` (PEP 668's EXTERNALLY-MANAGED marker, as current Debian and Ubuntu ship), and
# times it. The "system" Python is this machine's python3 relocated into a temporary prefix whose
# standard library carries the marker; the check first makes sure that Python refuses pip.
#
#     scripts/check_pep668.sh                 # the whole quickstart (about 10 minutes)
#     scripts/check_pep668.sh --venv-only     # ... and that the scripts' .venv installs (tests)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
base="${CHECK_PYTHON:-python3}"
real="$("$base" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
stdlib="$("$base" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
pyver="$(basename "$stdlib")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
system="$work/system-python"
mkdir -p "$system/bin" "$system/lib/$pyver/site-packages"
cp "$real" "$system/bin/python3"  # its own prefix: the standard library below, not the original
for entry in "$stdlib"/*; do
    case "$(basename "$entry")" in
        site-packages|EXTERNALLY-MANAGED) ;;  # its own (never written through a link)
        *) ln -s "$entry" "$system/lib/$pyver/" ;;
    esac
done
pip_dir="$("$base" -c 'import os, pip; print(os.path.dirname(pip.__file__))' 2>/dev/null || true)"
[ -n "$pip_dir" ] && ln -s "$pip_dir" "$system/lib/$pyver/site-packages/pip"
printf '[externally-managed]\nError=this Python is managed by the system (simulated by %s)\n' \
    "$0" > "$system/lib/$pyver/EXTERNALLY-MANAGED"

if [ -n "$pip_dir" ]; then
    if "$system/bin/python3" -m pip install --quiet --dry-run --no-deps six >"$work/pip.log" 2>&1
    then
        echo "FAIL: the simulated system Python accepted pip install" >&2
        exit 1
    fi
    grep -q "externally-managed-environment" "$work/pip.log" || { cat "$work/pip.log" >&2; exit 1; }
    echo "the simulated system Python refuses pip install (PEP 668): ok"
else  # a system Python without pip (Debian's python3 without python3-pip) cannot install either
    echo "the simulated system Python has no pip; it refuses pip install (PEP 668): ok"
fi
if [ "${1:-}" = "--venv-only" ]; then  # the scripts' environment step alone, in a bare folder
    mkdir -p "$work/bare/scripts" && cp "$repo/scripts/venv.sh" "$work/bare/scripts/"
    (cd "$work/bare" && env -u VIDIT_PYTHON PATH="$system/bin:$PATH" bash -c \
        'source scripts/venv.sh && "$PYTHON" -m pip install --quiet --dry-run --no-deps six')
    echo "scripts/venv.sh under that Python: .venv created, pip installs into it: ok"
    exit 0
fi

git clone --quiet "$repo" "$work/vidit"
cd "$work/vidit"
start=$(date +%s)
# As on a fresh machine: no pip or uv cache, and vidit's dataset, classifier and XLA caches empty.
env -u VIDIT_PYTHON PATH="$system/bin:$PATH" WORKDIR="$work/run" PIP_NO_CACHE_DIR=1 \
    VIDIT_DATA_DIR="$work/cache/datasets" VIDIT_CACHE="$work/cache" \
    UV_CACHE_DIR="$work/cache/uv" VIDIT_XLA_CACHE="$work/cache/xla" scripts/quickstart.sh
echo "quickstart from a fresh clone under a PEP 668 Python: $(( $(date +%s) - start )) s"

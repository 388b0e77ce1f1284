# Sourced by the scripts after venv.sh: `install_vidit EXTRAS` installs vidit (editable) with its
# dependencies and EXTRAS into $PYTHON's environment. uv, installed into that environment first,
# fetches and unpacks the ~115 packages in parallel from the indexes pip is configured with
# (scripts/uv_install.py): a fresh install took 14 s against 73 s with pip (2026-12-08,
# docs/quickstart). VIDIT_INSTALLER=pip installs with pip; so does any failure of uv.
install_vidit() {
    if [ "${VIDIT_INSTALLER:-uv}" != pip ] \
        && { "$PYTHON" -m uv --version >/dev/null 2>&1 \
             || "$PYTHON" -m pip install --quiet --disable-pip-version-check "uv==0.13.10"; } \
        && "$PYTHON" scripts/uv_install.py --quiet -e ".[$1]"; then
        return 0
    fi
    [ "${VIDIT_INSTALLER:-uv}" = pip ] || echo "uv did not install vidit; installing with pip"
    # --no-compile: modules are byte-compiled on their first import instead of every installed
    # file at install time (most of jaxlib, scipy, ... are never imported): a fresh install took
    # 105 s against 178 s (2026-12-07). uv compiles nothing at install either.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile -e ".[$1]"
}

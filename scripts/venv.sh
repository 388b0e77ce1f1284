# Sourced by the scripts: sets PYTHON to the project's virtual environment (.venv, created on
# first use) or to $VIDIT_PYTHON.
if [ -n "${VIDIT_PYTHON:-}" ]; then
    PYTHON="$VIDIT_PYTHON"
else
    if [ ! -x .venv/bin/python ]; then
        echo "creating the project's virtual environment in .venv"
        python3 -m venv .venv
    fi
    PYTHON=.venv/bin/python
    echo "using the virtual environment .venv (activate it with: source .venv/bin/activate)"
fi

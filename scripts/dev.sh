#!/usr/bin/env bash
# Set up the development environment in .venv (if needed) and run one job.
#
#   bash scripts/dev.sh demo [opx demo options]   set up, then run the demo
#   bash scripts/dev.sh test [pytest options]     set up, then lint, test, build docs
#   bash scripts/dev.sh setup                     set up only
#
# PYTHON names the interpreter that creates the environment (default python3,
# which must be 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

job=${1:-}
[ $# -gt 0 ] && shift
case "$job" in
  setup|demo|test) ;;
  *) echo "usage: bash scripts/dev.sh {setup|demo|test} [options]; got '${job}'" >&2
     exit 2 ;;
esac

python=${PYTHON:-python3}
venv=.venv
stamp=$venv/.opextract-installed

if [ ! -x "$venv/bin/python" ]; then
  "$python" - <<'PY' || exit 2
import sys
if sys.version_info < (3, 10):
    sys.exit(f"opextract needs Python >= 3.10; got {sys.version.split()[0]}")
PY
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# A bare torch requirement would resolve to a multi-GB CUDA build here; the
# CPU build 2.13.0 satisfies the package's range and installs in seconds.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip install "torch==2.13.0"
fi
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install -e ".[test,docs]"
  touch "$stamp"
fi

export PATH="$PWD/$venv/bin:$PATH"
case "$job" in
  setup) ;;
  demo) exec opx demo "$@" ;;
  test)
    ruff check .
    ruff format --check --quiet . || { echo "ruff format would change files: run 'ruff format .'" >&2; exit 1; }
    python -m pytest "$@"
    python -m sphinx -W --keep-going -q -b html docs docs/_build/html
    ;;
esac

# Sourced by the scripts: make .venv with marid and its dev tools installed, every distribution
# at the version constraints.txt pins (re-installed only when pyproject.toml or constraints.txt
# change). Needs Python 3.11+ (python3, or $PYTHON).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "marid needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
# An environment variable rather than -c: pip hands it on to the isolated environment it builds
# marid's wheel in, so setuptools is pinned there too.
export PIP_CONSTRAINT="$PWD/constraints.txt"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
unset PIP_CONSTRAINT

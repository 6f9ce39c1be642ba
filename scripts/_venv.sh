# Shared by scripts/test and scripts/demo: make sure a venv exists and holds the package.
# Usage: source scripts/_venv.sh VENV_DIR EXTRAS [UPGRADE...]
#   VENV_DIR  e.g. .venv (the MXNet profile) or .venv-core (the core on today's stack)
#   EXTRAS    like "[mxnet]" or "[mxnet,test]"
#   UPGRADE   packages to bring to their newest release (the core profile's numpy 2, ...)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/$1"
PY="$VENV/bin/python"
extras="${2:-}"
shift 2
upgrade=("$@")
stamp="$VENV/.normexport-installed${extras//[^a-z]/-}"
if [ ! -x "$PY" ]; then
  echo "scripts: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
# Reinstall when setup.cfg changed since the last install into this venv.
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
  echo "scripts: installing normexport$extras into $VENV (first run takes a few minutes)" >&2
  log="$VENV/pip-install.log"
  pip=("$PY" -m pip install --quiet --disable-pip-version-check)
  # pip's and setuptools' chatter goes to a log, shown only if the install fails.
  if ! { "${pip[@]}" --upgrade pip &&
         "${pip[@]}" -e "$ROOT$extras" &&
         { [ ${#upgrade[@]} -eq 0 ] || "${pip[@]}" --upgrade -e "$ROOT$extras" "${upgrade[@]}"; } &&
         "$PY" -m pip check; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "scripts: installing into $VENV failed (log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi

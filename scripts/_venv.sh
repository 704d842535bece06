# Sourced by ./scripts/demo and ./scripts/test: create or refresh .venv at the repository root.
# A stamp of pyproject.toml's hash skips the install when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "murmur: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)-$1"
have="$(cat "$VENV/.murmur-stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "murmur: installing dependencies into $VENV" >&2
    # torch is pinned first: 2.13.0 is the CPU build here; an open spec would pull CUDA wheels.
    # (pip's notes about this machine's local package mirrors are filtered out; errors are kept.)
    "$VENV/bin/python" -m pip install -q torch==2.13.0 2> >(grep -v '^WARNING: Location' >&2)
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$1]" 2> >(grep -v '^WARNING: Location' >&2)
    echo "$want" > "$VENV/.murmur-stamp"
fi

#!/usr/bin/env bash
# Create (once) the Python venv for the parity tests and print its python path as the last line
# of stdout. Progress and errors go to stderr. Idempotent: a venv whose install finished is
# marked with .complete and reused as is (fast path: the stamp and a python that starts, ~0.05 s).
#
# Location: ${XDG_CACHE_HOME:-~/.cache}/moe.h/venv-<first 12 hex of sha256(requirements.txt)>
# Interpreter: the first python3 on PATH (the pyenv Python on the project's machines).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
[ -f "$req" ] || { echo "setup_venv: missing $req" >&2; exit 1; }

hash="$(sha256sum "$req" | cut -c1-12)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/moe.h"
venv="$cache/venv-$hash"
py="$venv/bin/python"
mkdir -p "$cache"

verify() {
    "$py" - <<'PY' >&2
import numpy, ml_dtypes, safetensors, torch, transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: F401
x = torch.ones(3, requires_grad=True); (x * 2).sum().backward()
assert float(x.grad.sum()) == 6.0
PY
}

# Fast path: the stamp is written only after a full install + import check succeeded.
if [ -f "$venv/.complete" ] && "$py" -c 'import sys' 2>/dev/null; then
    echo "$py"; exit 0
fi

# Serialise concurrent setups (two test runs starting at once).
exec 9>"$cache/.lock-$hash"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if [ -f "$venv/.complete" ] && "$py" -c 'import sys' 2>/dev/null; then echo "$py"; exit 0; fi

base_py="$(command -v python3 || true)"
[ -n "$base_py" ] || { echo "setup_venv: no python3 on PATH" >&2; exit 1; }
base_py="$("$base_py" -c 'import sys; print(sys.executable)')"
echo "setup_venv: creating $venv with $base_py ($("$base_py" --version 2>&1))" >&2

rm -rf "$venv"
t0=$(date +%s)
"$base_py" -m venv "$venv" || { echo "setup_venv: python3 -m venv failed" >&2; rm -rf "$venv"; exit 1; }
log="$cache/install-$hash.log"  # kept outside the venv so a failed install leaves it
echo "setup_venv: installing pinned requirements (torch wheels are large; ~2 min on first run)" >&2
if ! "$py" -m pip install -q --disable-pip-version-check --no-input -r "$req" >"$log" 2>&1; then
    echo "setup_venv: pip install failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    rm -rf "$venv"
    exit 1
fi
if ! verify; then
    echo "setup_venv: installed, but the import check failed (see above); removing $venv" >&2
    rm -rf "$venv"
    exit 1
fi
t1=$(date +%s)
size="$(du -sh "$venv" 2>/dev/null | cut -f1)"
echo "installed in $((t1 - t0)) s, size $size, $(date -u +%FT%TZ)" >>"$log"
echo "setup_venv: done in $((t1 - t0)) s ($size)" >&2
touch "$venv/.complete"
echo "$py"

#!/usr/bin/env bash
# Run the external parity suite (transformers / PyTorch / ml_dtypes oracles) from the repo root.
# Prints "SUITE: N passed, M failed" last; exits with test_parity.py's status.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if ! py="$(bash "$here/setup_venv.sh" | tail -n 1)" || [ ! -x "$py" ]; then
    echo "FAIL setup_venv"
    echo "    could not create the parity venv (see messages above)"
    echo "SUITE: 0 passed, 1 failed"
    exit 1
fi
cd "$root"
"$py" "$here/test_parity.py" "$@"
exit $?

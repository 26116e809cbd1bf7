#!/usr/bin/env bash
# tests/test_plan.sh CC — bench/plan, the cost model on paper: its counts are moe.h's (plan
# --check: parameters and stashed activation bytes of real tiny and small models, exact), and
# its DeepSeek-V3 and LLaMA-3.1 405B lines are the published figures within the issue's
# tolerances. The published figures are DeepSeek's (V3 paper, the weights README, the V3
# hardware paper's Table 2), not ours. Ends with "SUITE: N passed, M failed".
set -u
cd "$(dirname "$0")/.."
CC=${1:-gcc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
ok() { echo "ok   $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1"; fail=$((fail + 1)); }
if ! $CC -std=c99 -O2 -ffp-contract=off -Wall -Wextra -Werror -I. bench/plan.c -o "$tmp/plan" -lm 2>"$tmp/cc.log"; then
    cat "$tmp/cc.log"; bad "plan compiles"; echo "SUITE: $pass passed, $fail failed"; exit 1
fi
if "$tmp/plan" --check >"$tmp/check.txt" 2>&1; then ok "plan --check: the cost model's counts are moe.h's"
else bad "plan --check"; fi
cat "$tmp/check.txt"
"$tmp/plan" >"$tmp/plan.txt" 2>&1 || bad "plan runs"
sed 's/^/     /' "$tmp/plan.txt" | head -n -1
# name, JSON path, published value, relative tolerance
while read -r name key want tol; do
    got=$(tail -n 1 "$tmp/plan.txt" | python3 -c "import json,sys; d=json.load(sys.stdin); a,b='$key'.split('.'); print(d[a][b])" 2>/dev/null)
    if [ -z "$got" ]; then bad "$name: no $key in the JSON line"; continue; fi
    if awk -v g="$got" -v w="$want" -v t="$tol" 'BEGIN { r = g / w - 1; if (r < 0) r = -r; exit !(r <= t) }'; then
        ok "$name: $got vs published $want (within $tol)"
    else
        bad "$name: $got vs published $want (tolerance $tol)"
    fi
done <<'T'
v3_params_total deepseek_v3.params_total 671e9 0.01
v3_params_active deepseek_v3.params_active 36.7e9 0.01
v3_train_flops deepseek_v3.train_flops_per_token 250e9 0.05
v3_kv_bytes deepseek_v3.kv_bytes_per_token 70272 0.01
llama_train_flops llama3_405b.train_flops_per_token 2448e9 0.05
llama_kv_bytes llama3_405b.kv_bytes_per_token 516e3 0.01
T
echo "SUITE: $pass passed, $fail failed"
[ "$fail" = 0 ]

#!/usr/bin/env bash
# tests/compile_matrix.sh — moe.h compiles warning-free as C99 (gcc, clang) and C++ (g++),
# in two translation units of one program (one with MOE_IMPLEMENTATION) so that duplicate
# symbols would fail the link; plus the build variants. (The CUDA build is the cuda suite's.)
# Prints one ok/FAIL line per case and ends with "SUITE: N passed, M failed".
set -u
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
W="-Wall -Wextra -Wpedantic -Werror"
pass=0 fail=0

cat > "$tmp/impl.c" <<'C'
#define MOE_IMPLEMENTATION
#include "moe.h"
int use_api(void);
int main(void) { return use_api(); }
C
cat > "$tmp/user.c" <<'C'
#include "moe.h"
/* A second translation unit that only includes the declarations. */
int use_api(void) {
    moe_ctx *ctx = 0;
    moe_tensor *t = 0;
    int64_t shape[2] = {2, 3};
    int rc;
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    rc = moe_tensor_new(ctx, MOE_F32, 2, shape, &t) != MOE_OK;
    rc |= moe_f32_to_bf16(1.0f) != 0x3F80;
    rc |= moe_e4m3_to_f32(moe_f32_to_e4m3(448.0f)) != 448.0f;
    moe_tensor_free(ctx, t);
    moe_ctx_free(ctx);
    return rc;
}
C
cp "$tmp/impl.c" "$tmp/impl.cpp"
cp "$tmp/user.c" "$tmp/user.cpp"

case_run() { # case_run NAME COMMAND...
    local name=$1; shift
    if out=$("$@" 2>&1); then
        echo "ok   $name"; pass=$((pass + 1))
    else
        echo "FAIL $name"; printf '%s\n' "$out" | head -n 20 | sed 's/^/     /'; fail=$((fail + 1))
    fi
}
two_tu() { # two_tu COMPILER STD EXT EXTRA...
    local cc=$1 std=$2 ext=$3; shift 3
    $cc -std="$std" $W -I. "$@" -c "$tmp/impl.$ext" -o "$tmp/impl.o" &&
        $cc -std="$std" $W -I. "$@" -c "$tmp/user.$ext" -o "$tmp/user.o" &&
        $cc "$@" "$tmp/impl.o" "$tmp/user.o" -o "$tmp/prog" -lm && "$tmp/prog"
}

case_run "gcc -std=c99, two TUs" two_tu gcc c99 c -O2
command -v clang >/dev/null && case_run "clang -std=c99, two TUs" two_tu clang c99 c -O2
case_run "g++ -std=c++17, two TUs" two_tu g++ c++17 cpp -O2
command -v clang++ >/dev/null && case_run "clang++ -std=c++17, two TUs" two_tu clang++ c++17 cpp -O2
case_run "gcc -std=c99 -O3 -march=native -fopenmp, two TUs" two_tu gcc c99 c -O3 -march=native -fopenmp -ffp-contract=off
case_run "gcc -std=c99 MOE_NO_SIMD, two TUs" two_tu gcc c99 c -O2 -DMOE_NO_SIMD
case_run "gcc -std=c99 MOE_NO_SIMD -march=native, two TUs" two_tu gcc c99 c -O2 -march=native -DMOE_NO_SIMD
# the SIMD paths of other CPUs, compiled only (this machine may not run them): AVX2 alone,
# AVX-512 without AVX512_BF16, and AMX (Sapphire Rapids) from each compiler
for isa in "-mavx2 -mfma" "-march=skylake-avx512" "-march=sapphirerapids"; do
    case_run "gcc -std=c99 $isa (compiled)" gcc -std=c99 $W -I. -O2 $isa -fopenmp -c "$tmp/impl.c" -o "$tmp/isa.o"
    command -v clang >/dev/null && case_run "clang -std=c99 $isa (compiled)" clang -std=c99 $W -I. -O2 $isa -c "$tmp/impl.c" -o "$tmp/isa.o"
    case_run "g++ -std=c++17 $isa (compiled)" g++ -std=c++17 $W -I. -O2 $isa -c "$tmp/impl.cpp" -o "$tmp/isa.o"
done
case_run "gcc -std=c99 MOE_REAL_F64 (gradient-check build)" gcc -std=c99 $W -I. -DMOE_REAL_F64 -c "$tmp/impl.c" -o "$tmp/f64.o"
case_run "gcc -std=c99 MOE_STATIC in one TU" sh -c "printf '#define MOE_STATIC\n#define MOE_IMPLEMENTATION\n#include \"moe.h\"\nint main(void){moe_ctx *c=0; if (moe_ctx_new(&c)) return 1; moe_ctx_free(c); return 0;}\n' > '$tmp/st.c' && gcc -std=c99 $W -Wno-unused-function -I. '$tmp/st.c' -o '$tmp/st' -lm && '$tmp/st'"
echo "SUITE: $pass passed, $fail failed"
[ "$fail" = 0 ]

#!/usr/bin/env bash
# tests/gpu/run.sh — everything GPU in one go, for the rare, short loan of an H100/H200
# (../shared/reference/gpu.md §7.3). From the repository root:
#     bash tests/gpu/run.sh            (data/austen.txt must be there: carry it to the machine)
# Each stage has its own time limit and log (stageN.log in $OUT, or build/gpu-run); a failed
# stage is recorded and the next one runs. The table comes last, then one JSON line.
#   0 env         nvidia-smi, nvcc, compute-sanitizer
#   1 build       ./build.sh cuda (library, train_tiny, generate, the table test, the conversion
#                 check, bench/gpu.cu) and the CPU train_tiny
#   2 conversions all 2^32 floats: moe.h's f32 → bf16 / f16 / e4m3 / e5m2 (and every code back)
#                 against the CUDA intrinsics; pass = 0 mismatches
#   3 table       tests/test_backend.c with the CUDA backend against its references, each entry
#                 in its exactness class; pass = 0 failed
#   4 training    train_tiny, 50 steps of the tiny config from the same seed: CPU, GPU, GPU again.
#                 pass = the GPU's loss within TRAIN_TOL (relative) of the CPU's at every step,
#                 and the two GPU checkpoints byte-identical; BF16 and FP8 GPU runs end finite
#   5 generate    the GPU-trained checkpoint decoded greedily on the GPU, plain and speculative:
#                 pass = both run, and speculative gives plain's text (recorded: tokens shared
#                 with the CPU's greedy text)
#   6 sanitizer   compute-sanitizer memcheck over the table test (small shapes); pass = 0 errors
#   7 bench       bench/gpu.cu: the FP8 GEMMs on Hopper's tensor cores against the recipe's
#                 emulation (pass = normwise difference ≤ 1e-2), GEMM TFLOP/s (FP32, BF16, FP8,
#                 cuBLASLt BF16 alone) and the training step's tokens/s and MFU
#   8 nccl        tests/test_nccl.cu as one process (built by ./build.sh cuda when NCCL's headers
#                 and library are found, the toolkit's or a pip wheel's): the NCCL communicator
#                 with nranks = 1 through file: — collectives and ordered sums on device buffers
#                 against the host's values, the device block sum bit for bit, and
#                 moe_model_reduce_grads leaving a GPU model's gradients unchanged; pass = 0
#                 failed; skip = no GPU or no NCCL (never run on a GPU before this stage)
#
# TRAIN_TOL = 2e-2: FP32 on both sides, but the GPU sums in other orders (GEMMs, attention,
# norms), so the two runs drift apart through training's feedback — by ~1e-6 at step 1,
# growing with the steps; a routing decision that flips at a near-tie moves a step's loss by
# up to ~1e-2 on this 4.8M-parameter model. A wrong kernel moves it by far more (a bad
# gradient stalls the loss at its 5.5 start; a bad forward shifts it at step 1).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/gpu-run}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TRAIN_TOL=2e-2
declare -A RESULT NOTE
ORDER=""
record() { RESULT[$1]=$2; NOTE[$1]=$3; ORDER="$ORDER $1"; }
export OUT
stage() { # stage NAME SECONDS CMD...: run (a command or an exported function) with a limit, log to $OUT/NAME.log
    local name=$1 secs=$2 rc=0 t0=$SECONDS; shift 2
    echo "== $name (limit ${secs} s)" >&2
    timeout "$secs" bash -c '"$@"' bash "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    echo "   $name: exit $rc after $((SECONDS - t0)) s" >&2
    return $rc
}

# ---- 0 env ----
{ nvidia-smi; nvcc --version; command -v compute-sanitizer; } >"$OUT/env.log" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
record env "$([ -n "$GPU" ] && echo ok || echo FAIL)" "${GPU:-no GPU found}"

# ---- 1 build ----
build() {
    ./build.sh cuda || return 1
    gcc -std=c99 -ffp-contract=off -O3 -march=native -fopenmp -Wall -Wextra -Wpedantic -Werror -I. \
        examples/train_tiny.c -o build/train_tiny -lm || return 1
    gcc -std=c99 -ffp-contract=off -O3 -march=native -fopenmp -Wall -Wextra -Wpedantic -Werror -I. \
        examples/generate.c -o build/generate -lm
}
export -f build
if stage build 300 build; then record build ok "build/cuda/*"; else record build FAIL "see build.log"; fi

# ---- 2 conversions ----
if stage conversions 120 build/cuda/gpu_conversions; then
    record conversions ok "$(grep -ci mismatch "$OUT/conversions.log" || true) lines mention mismatches; 0 counted"
else
    record conversions FAIL "$(grep -i -m 3 mismatch "$OUT/conversions.log" | tr '\n' ' ')"
fi

# ---- 3 table ----
stage table 240 build/cuda/test_backend --device cuda
TABLE=$(grep -E '^SUITE:' "$OUT/table.log" | tail -n 1)
if [[ "$TABLE" =~ SUITE:\ ([0-9]+)\ passed,\ 0\ failed ]]; then record table ok "$TABLE"
else record table FAIL "${TABLE:-did not finish}; $(grep -m 3 '^FAIL' "$OUT/table.log" | tr '\n' ' ')"; fi

# ---- 4 training ----
train() { # train BIN OUTDIR [flags]
    local bin=$1 dir=$2; shift 2
    rm -rf "$dir"
    "$bin" --steps 50 --seconds 0 --val-every 1000 --sample 0 --save-every 0 --out "$dir" "$@"
}
training() {
    [ -f data/austen.txt ] || bash data/prepare.sh || { echo "no data/austen.txt (carry it)"; return 1; }
    train build/train_tiny "$OUT/train_cpu" || return 1
    train build/cuda/train_tiny "$OUT/train_gpu1" --device cuda || return 1
    train build/cuda/train_tiny "$OUT/train_gpu2" --device cuda || return 1
    train build/cuda/train_tiny "$OUT/train_gpu_bf16" --device cuda --precision bf16 || return 1
    train build/cuda/train_tiny "$OUT/train_gpu_fp8" --device cuda --precision fp8 --fp8-block 32 || return 1
}
export -f train training
TRAIN_NOTE="FAIL did not finish (see training.log)"
if stage training 300 training; then
    TRAIN_NOTE=$(python3 - "$OUT" "$TRAIN_TOL" <<'EOF'
import csv, sys, os, filecmp, glob, math
out, tol = sys.argv[1], float(sys.argv[2])
def losses(d):
    with open(os.path.join(out, d, "log.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
cpu, g1, g2 = losses("train_cpu"), losses("train_gpu1"), losses("train_gpu2")
worst = max(abs(a - b) / abs(b) for a, b in zip(g1, cpu))
ck = lambda d: sorted(glob.glob(os.path.join(out, d, "ckpt-*.bin")))[-1]
same = filecmp.cmp(ck("train_gpu1"), ck("train_gpu2"), shallow=False)
ends = {p: losses("train_gpu_" + p)[-1] for p in ("bf16", "fp8")}
ok = len(cpu) == len(g1) == 50 and worst <= tol and same and all(math.isfinite(v) for v in ends.values())
print(("ok" if ok else "FAIL") + f" steps {len(g1)}; max |gpu-cpu|/cpu {worst:.2e} (tol {tol:g}); final loss cpu {cpu[-1]:.4f} "
      f"gpu {g1[-1]:.4f}; two GPU runs {'identical' if same else 'DIFFER'}; bf16 {ends['bf16']:.4f} fp8 {ends['fp8']:.4f}")
EOF
)
fi
record training "${TRAIN_NOTE%% *}" "${TRAIN_NOTE#* }"
[ "${RESULT[training]}" = ok ] || RESULT[training]=FAIL

# ---- 5 generate ----
generate() {
    local ck
    ck=$(ls "$OUT"/train_gpu1/ckpt-*.bin | tail -n 1)
    build/cuda/generate --model "$ck" --device cuda --max-tokens 64 >"$OUT/gen_gpu.txt" || return 1
    build/cuda/generate --model "$ck" --device cuda --max-tokens 64 --speculative >"$OUT/gen_gpu_spec.txt" || return 1
    build/generate --model "$ck" --max-tokens 64 >"$OUT/gen_cpu.txt" || return 1
}
export -f generate
if stage generate 120 generate; then
    shared=$(python3 -c "
import sys
a, b = open('$OUT/gen_gpu.txt', 'rb').read(), open('$OUT/gen_cpu.txt', 'rb').read()
n = 0
while n < min(len(a), len(b)) and a[n] == b[n]: n += 1
print(n, len(a))")
    if cmp -s "$OUT/gen_gpu.txt" "$OUT/gen_gpu_spec.txt"; then record generate ok "speculative = plain; GPU and CPU greedy share the first ${shared% *} of ${shared#* } bytes"
    else record generate FAIL "speculative differs from plain on the GPU; GPU and CPU share ${shared% *} bytes"; fi
else
    record generate FAIL "see generate.log"
fi

# ---- 6 sanitizer ----
if command -v compute-sanitizer >/dev/null 2>&1; then
    MOE_TEST_QUICK=1 stage sanitizer 240 compute-sanitizer --tool memcheck --error-exitcode 9 build/cuda/test_backend --device cuda
    SAN=$(grep -m 1 'ERROR SUMMARY' "$OUT/sanitizer.log")
    if [[ "$SAN" == *"0 errors"* ]]; then record sanitizer ok "$SAN"; else record sanitizer FAIL "${SAN:-did not finish}"; fi
else
    record sanitizer FAIL "compute-sanitizer not found"
fi

# ---- 7 bench ----
if stage bench 300 build/cuda/bench_gpu && ! grep -q 'emulation.*FAIL' "$OUT/bench.log"; then
    record bench ok "$(grep -m 1 'emulation' "$OUT/bench.log" | sed 's/.*difference/FP8 tc vs emulation/')"
else
    record bench FAIL "$(grep -m 1 'emulation' "$OUT/bench.log"); see bench.log"
fi
BENCH_JSON=$(grep '^{"bench":"gpu"' "$OUT/bench.log" | tail -n 1)

# ---- 8 nccl ----
if [ ! -x build/cuda/test_nccl ]; then
    record nccl skip "build/cuda/test_nccl not built (no NCCL headers and library found; see build.log)"
else
    stage nccl 30 build/cuda/test_nccl
    NCCL_SUITE=$(grep -E '^SUITE:' "$OUT/nccl.log" | tail -n 1)
    if grep -q '^SKIP gpu_smoke' "$OUT/nccl.log"; then record nccl skip "$(grep -m 1 '^SKIP' "$OUT/nccl.log")"
    elif [[ "$NCCL_SUITE" =~ SUITE:\ ([0-9]+)\ passed,\ 0\ failed ]]; then record nccl ok "nranks=1: $NCCL_SUITE"
    else record nccl FAIL "${NCCL_SUITE:-did not finish}; $(grep -m 3 '^FAIL' "$OUT/nccl.log" | tr '\n' ' ')"; fi
fi

# ---- the table, then JSON ----
echo
cat "$OUT/bench.log" 2>/dev/null | grep -v '^{' | tail -n 30
echo
printf '%-12s %-5s %s\n' stage result note
json=""
for s in $ORDER; do
    printf '%-12s %-5s %s\n' "$s" "${RESULT[$s]}" "${NOTE[$s]}"
    json="$json${json:+,}\"$s\":\"${RESULT[$s]}\""
done
echo "{\"gpu_run\":{$json},\"device\":\"$GPU\",\"bench\":${BENCH_JSON:-null}}"

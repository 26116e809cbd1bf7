#!/usr/bin/env bash
# tests/valgrind.sh — the trainer and the generator under valgrind's memcheck: 0 errors.
#
# valgrind 3.19 cannot decode AVX-512, so this is a portable build: -DMOE_NO_SIMD, no
# -march=native, no OpenMP. On a 4 kB corpus: train_tiny trains 4 steps (checkpoints, the
# Hugging Face export, the closing validation, a sample), resumes to 6 and then to 8 with a
# NaN loss and a NaN gradient injected (the skip paths), and generate decodes from the
# checkpoint (plain and speculative) and from the HF directory. Each run must exit 0 with
# "ERROR SUMMARY: 0 errors" and no definite or indirect leak.
# Prints one ok/FAIL line per case and ends with "SUITE: N passed, M failed".
set -u
cd "$(dirname "$0")/.."
CC=${1:-gcc}
W="-std=c99 -ffp-contract=off -Wall -Wextra -Wpedantic -Werror -I."
dir=build/valgrind_$$
mkdir -p "$dir"
pass=0 fail=0
if ! command -v valgrind >/dev/null; then echo "FAIL valgrind is not installed"; echo "SUITE: 0 passed, 1 failed"; exit 1; fi
for p in train_tiny generate; do
    if ! $CC $W -O1 -g -DMOE_NO_SIMD "examples/$p.c" -o "$dir/$p" -lm; then
        echo "FAIL portable build of examples/$p.c"; echo "SUITE: 0 passed, 1 failed"; exit 1
    fi
done
head -c 4000 data/austen.txt > "$dir/corpus.txt"

VG="valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect"
case_run() { # case_run NAME PROGRAM ARGS...
    local name=$1; shift
    local log="$dir/$name.log" rc=0 t0=$SECONDS
    $VG "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" = 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        echo "ok   $name"; echo "     $(grep -o 'ERROR SUMMARY: .*' "$log" | tail -n 1); $((SECONDS - t0)) s"; pass=$((pass + 1))
    else
        echo "FAIL $name (exit $rc)"; grep -E "ERROR SUMMARY|Invalid|uninitialised|definitely|indirectly|train_tiny:|generate:" "$log" | head -n 20 | sed 's/^/     /'
        fail=$((fail + 1))
    fi
}
T="--data $dir/corpus.txt --out $dir/run --batch 2 --seq 16 --val-every 2 --save-every 2 --save-every-seconds 0 --seconds 0"
case_run train_4_steps_save_export "$dir/train_tiny" $T --steps 4 --sample 8
case_run resume_to_6_steps "$dir/train_tiny" $T --steps 6 --sample 0 --resume auto
case_run resume_to_8_with_skipped_steps "$dir/train_tiny" $T --steps 8 --sample 0 --resume auto --inject nan-loss@7,nan-grad@8
case_run generate_from_checkpoint "$dir/generate" --model "$dir/run/ckpt.bin" --max-tokens 8
case_run generate_speculative "$dir/generate" --model "$dir/run/ckpt.bin" --max-tokens 8 --speculative
case_run generate_from_hf_directory "$dir/generate" --model "$dir/run/hf" --max-tokens 8
[ "$fail" = 0 ] && rm -rf "$dir"
echo "SUITE: $pass passed, $fail failed"
[ "$fail" = 0 ]

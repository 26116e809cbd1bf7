#!/usr/bin/env bash
# tests/fuzz/campaign.sh — a long fuzzing campaign: each TARGET in turn until it has RUNS
# executions (default 10^7), on its persistent corpus build/fuzz/corpus/TARGET plus the seeds
# and the regression inputs. Run ./build.sh fuzz TARGET 1 first (it builds the binaries and the
# seeds). Meant for the background, at the lowest priority:
#
#   nohup nice -n 19 bash tests/fuzz/campaign.sh hf_weights safetensors >/dev/null 2>&1 &
#
# Writes build/fuzz/campaign/TARGET.log (libFuzzer's output) and appends one line per target to
# build/fuzz/campaign/summary.txt: target, executions, wall seconds, exit status, crashes.
set -u
cd "$(dirname "$0")/../.."
F=build/fuzz
RUNS=${RUNS:-10000000}
mkdir -p "$F/campaign"
for t in "$@"; do
    [ -x "$F/bin/fuzz_$t" ] || { echo "$t: $F/bin/fuzz_$t missing (run ./build.sh fuzz $t 1)" >>"$F/campaign/summary.txt"; continue; }
    mkdir -p "$F/corpus/$t" "$F/crashes/$t"
    dict=""; [ -f "$F/dict/$t.dict" ] && dict="-dict=$F/dict/$t.dict"
    reg=""; [ -d "tests/fuzz/regressions/$t" ] && reg="tests/fuzz/regressions/$t"
    t0=$(date +%s)
    rc=0
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 "$F/bin/fuzz_$t" -runs="$RUNS" -print_final_stats=1 \
        -timeout=20 -rss_limit_mb=1024 -artifact_prefix="$F/crashes/$t/" $dict "$F/corpus/$t" "$F/seeds/$t" $reg \
        >"$F/campaign/$t.log" 2>&1 || rc=$?
    t1=$(date +%s)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$F/campaign/$t.log" | tail -n 1)
    printf '%s %s execs %s s exit %s crashes %s cpu "%s" finished %s\n' "$t" "${execs:-?}" "$((t1 - t0))" "$rc" \
        "$(ls "$F/crashes/$t" | wc -l)" "$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)" "$(date -u +%FT%TZ)" \
        >>"$F/campaign/summary.txt"
done

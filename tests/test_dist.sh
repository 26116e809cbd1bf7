#!/usr/bin/env bash
# tests/test_dist.sh CC — the communicator's suite (tests/test_dist.c) on one process (SELF,
# built with CC) and under Open MPI with 1, 2, 3 and 4 ranks (mpicc -DMOE_MPI; more ranks
# than cores, one OpenMP thread each, as environment.md measured), then data-parallel
# training (examples/train_tiny) against one process, checkpoint bytes compared. Each run is
# a SUITE of its own; this adds them up. A run that hangs is stopped after 300 s and fails.
set -u
cd "$(dirname "$0")/.."
CC=${1:-gcc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
W="-std=c99 -O2 -ffp-contract=off -Wall -Wextra -Wpedantic -Werror -I. -Itests"
pass=0 fail=0
add() { # add OUTPUT-FILE: count its SUITE line (none: one failure)
    local line
    line=$(grep -E '^SUITE: [0-9]+ passed, [0-9]+ failed$' "$1" | tail -n 1)
    if [ -z "$line" ]; then fail=$((fail + 1)); return; fi
    pass=$((pass + $(echo "$line" | sed -E 's/^SUITE: ([0-9]+) passed.*/\1/')))
    fail=$((fail + $(echo "$line" | sed -E 's/.* ([0-9]+) failed$/\1/')))
}
if $CC $W tests/test_dist.c -o "$tmp/dist_self" -lm; then
    echo "== one process (SELF)"
    "$tmp/dist_self" >"$tmp/self.txt" 2>&1
    grep -v '^SUITE' "$tmp/self.txt"; add "$tmp/self.txt"
else
    echo "FAIL test_dist.c does not compile"; fail=$((fail + 1))
fi
if mpicc $W -DMOE_MPI tests/test_dist.c -o "$tmp/dist_mpi" -lm; then
    for np in 1 2 3 4; do
        echo "== mpirun -np $np"
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
            timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$tmp/dist_mpi" >"$tmp/np$np.txt" 2>&1
        rc=$?
        grep -v '^SUITE' "$tmp/np$np.txt"
        [ "$rc" = 124 ] && echo "FAIL mpirun -np $np did not end within 300 s"
        add "$tmp/np$np.txt"
        if [ "$rc" != 0 ] && grep -q ' 0 failed$' "$tmp/np$np.txt"; then fail=$((fail + 1)); fi # passed, yet exited non-zero
    done
    # ZeRO-1 in many rounds: buckets of 5,000 values split a shard into rounds of 5,000 / P
    if mpicc $W -DMOE_MPI -DMOE_COMM_BUCKET=5000 tests/test_dist.c -o "$tmp/dist_small_bucket" -lm; then
        for np in 3 4; do
            echo "== mpirun -np $np, MOE_COMM_BUCKET=5000"
            OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
                timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$tmp/dist_small_bucket" >"$tmp/sb$np.txt" 2>&1
            grep -v '^SUITE' "$tmp/sb$np.txt"; add "$tmp/sb$np.txt"
        done
    else
        echo "FAIL test_dist.c does not compile with MOE_COMM_BUCKET=5000"; fail=$((fail + 1))
    fi
    # a rank that dies before a collective: the job must end with an error, not hang
    echo "== mpirun -np 3, rank 1 exits before the first collective"
    t0=$(date +%s)
    MOE_TEST_DIE_RANK=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
        timeout 60 mpirun -np 3 --oversubscribe --bind-to none "$tmp/dist_mpi" >"$tmp/die.txt" 2>&1
    rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q "exiting on purpose" "$tmp/die.txt"; then
        echo "ok   a dead rank ends the job: mpirun exit $rc after $(($(date +%s) - t0)) s"; pass=$((pass + 1))
    else
        echo "FAIL a dead rank: mpirun exit $rc (124: still running after 60 s)"; fail=$((fail + 1))
    fi
else
    echo "FAIL test_dist.c does not compile with mpicc -DMOE_MPI"; fail=$((fail + 1))
fi

# ---- bootstrap without MPI: ranks from the environment, rank 0's 128 bytes to all ----
# (what NCCL's unique id travels by when the launcher has no MPI: tests/test_share.c; with
# NCCL's headers on this host, the bytes are a real ncclGetUniqueId, which needs no GPU)
allsame() { # allsame NAME P FILES...: every file holds one "rank r of P: HASH" line, one HASH
    local name=$1 np=$2; shift 2
    local lines hashes
    lines=$(cat "$@" 2>/dev/null | grep -c "^rank [0-9]* of $np: ")
    hashes=$(cat "$@" 2>/dev/null | sed -n "s/^rank [0-9]* of $np: //p" | sort -u | wc -l)
    if [ "$lines" = "$np" ] && [ "$hashes" = 1 ]; then echo "ok   $name: $np processes hold the same bytes"; pass=$((pass + 1))
    else echo "FAIL $name: $lines of $np processes answered, $hashes distinct values"; cat "$@" | sed 's/^/     /'; fail=$((fail + 1)); fi; }
share_flags=""; share_libs=""
if [ -f /usr/local/cuda/include/nccl.h ] && [ -f /usr/local/cuda/lib64/libnccl.so ]; then
    share_flags="-DMOE_TEST_NCCL -isystem /usr/local/cuda/include"; share_libs="-L/usr/local/cuda/lib64 -lnccl -Wl,-rpath,/usr/local/cuda/lib64"
fi
if $CC $W $share_flags tests/test_share.c -o "$tmp/share" $share_libs -lm; then
    echo "== bootstrap without MPI ($([ -n "$share_flags" ] && echo "NCCL unique ids" || echo "random bytes"))"
    port=$((20000 + RANDOM % 20000))
    for r in 3 2 1 0; do MOE_RANK=$r MOE_WORLD_SIZE=4 "$tmp/share" "tcp:127.0.0.1:$port" >"$tmp/tcp$r.txt" 2>&1 & sleep 0.2; done; wait
    allsame "tcp (rank 0 starts last: the others retry)" 4 "$tmp"/tcp?.txt
    for r in 2 1 0; do SLURM_PROCID=$r SLURM_NTASKS=3 "$tmp/share" "file:$tmp/id.boot" >"$tmp/file$r.txt" 2>&1 & sleep 0.2; done; wait
    allsame "file, ranks from Slurm's variables" 3 "$tmp"/file?.txt
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun -np 3 --oversubscribe --bind-to none \
        "$tmp/share" "file:$tmp/id2.boot" >"$tmp/ompi.txt" 2>&1
    allsame "file, ranks from Open MPI's variables" 3 "$tmp/ompi.txt"
    MOE_RANK=1 MOE_WORLD_SIZE=2 "$tmp/share" "tcp:127.0.0.1:$((port + 1))" 0.5 >"$tmp/t1.txt" 2>&1; rc1=$?
    MOE_RANK=1 MOE_WORLD_SIZE=2 "$tmp/share" "file:$tmp/never.boot" 0.5 >"$tmp/t2.txt" 2>&1; rc2=$?
    MOE_RANK=2 MOE_WORLD_SIZE=2 "$tmp/share" "file:$tmp/x" >"$tmp/t3.txt" 2>&1; rc3=$?
    if [ "$rc1" = 1 ] && grep -q "did not answer" "$tmp/t1.txt" && [ "$rc2" = 1 ] && grep -q "after 0.5 s" "$tmp/t2.txt" &&
        [ "$rc3" = 1 ] && grep -q "MOE_RANK=2 of MOE_WORLD_SIZE=2" "$tmp/t3.txt"; then
        echo "ok   no rank 0 (tcp, file) and a rank out of range end with an error"; pass=$((pass + 1))
    else
        echo "FAIL bootstrap errors: $(cat "$tmp"/t[123].txt)"; fail=$((fail + 1))
    fi
    # A wrong peer on the port: one that accepts and never sends (the receive must stop), one
    # whose accept queue is full so that the SYNs go unanswered (connect must stop). Timeout
    # 1 s; the process must end within 5 s (4 s of margin for a loaded machine), where the
    # builds without deadlines waited for the peer to go (it holds for 20 s; the case's own
    # limit is 60 s).
    for mode in accepts full; do
        hport=$((port + 2 + RANDOM % 1000))
        "$tmp/share" hold "$hport" 20 "$mode" >"$tmp/hold.txt" 2>&1 & hpid=$!
        for i in $(seq 1 100); do grep -q listening "$tmp/hold.txt" && break; sleep 0.05; done
        t0=$(date +%s%N)
        MOE_RANK=1 MOE_WORLD_SIZE=2 timeout 60 "$tmp/share" "tcp:127.0.0.1:$hport" 1 >"$tmp/t4.txt" 2>&1; rc=$?
        ms=$((($(date +%s%N) - t0) / 1000000))
        kill "$hpid" 2>/dev/null; wait "$hpid" 2>/dev/null
        want="did not arrive within the timeout of 1 s"; [ "$mode" = full ] && want="did not answer at 127.0.0.1:$hport within the timeout of 1 s"
        if grep -q listening "$tmp/hold.txt" && [ "$rc" = 1 ] && [ "$ms" -lt 5000 ] && grep -q "$want" "$tmp/t4.txt"; then
            echo "ok   tcp, a peer that $([ "$mode" = full ] && echo "never answers the connect" || echo "accepts and never sends"): error after $ms ms (timeout 1 s)"
            pass=$((pass + 1))
        else
            echo "FAIL tcp, wrong peer ($mode): exit $rc after $ms ms: $(cat "$tmp/t4.txt" "$tmp/hold.txt")"; fail=$((fail + 1))
        fi
    done
    # A resolver that does not answer (a build whose getaddrinfo takes 20 s for "slow…"): the
    # lookup of HOST must stop at the timeout too (the build before waited the 20 s); an unknown
    # name is an error at once, named as such
    if $CC $W -DMOE_TEST_SLOW_LOOKUP tests/test_share.c -o "$tmp/share_slow" -lm; then
        t0=$(date +%s%N)
        MOE_RANK=1 MOE_WORLD_SIZE=2 timeout 60 "$tmp/share_slow" "tcp:slow.invalid:$port" 1 >"$tmp/t5.txt" 2>&1; rc=$?
        ms=$((($(date +%s%N) - t0) / 1000000))
        MOE_RANK=1 MOE_WORLD_SIZE=2 timeout 60 "$tmp/share_slow" "tcp:unknown.invalid:$port" 5 >"$tmp/t6.txt" 2>&1; rc6=$?
        if [ "$rc" = 1 ] && [ "$ms" -lt 5000 ] && grep -q "looking up 'slow.invalid' did not finish within the timeout of 1 s" "$tmp/t5.txt" &&
            [ "$rc6" = 1 ] && grep -q "cannot resolve 'unknown.invalid'" "$tmp/t6.txt"; then
            echo "ok   tcp, a name lookup that does not finish: error after $ms ms (timeout 1 s); an unknown name: 'cannot resolve'"
            pass=$((pass + 1))
        else
            echo "FAIL tcp, slow or unknown name: exit $rc after $ms ms, exit $rc6: $(cat "$tmp/t5.txt" "$tmp/t6.txt")"; fail=$((fail + 1))
        fi
    else
        echo "FAIL tests/test_share.c with MOE_TEST_SLOW_LOOKUP does not compile"; fail=$((fail + 1))
    fi
else
    echo "FAIL tests/test_share.c does not compile"; fail=$((fail + 1))
fi

# ---- data and expert parallelism: examples/train_tiny under mpirun against one process ----
# The same 6 steps (checkpoints at 3 and 6) of the tiny config, --accum P micro-batches of
# 4 x 32 tokens: P ranks with one micro-batch each must write the bytes one process writes
# accumulating the P micro-batches in order (cmp of the checkpoints) — data parallel, with
# ZeRO-1, expert parallel (EP = P, and EP = 2 x DP = 2) — in FP32 and BF16 (and FP8 for EP);
# the same MPI run twice gives the same bytes; a checkpoint resumes on another number of
# ranks, with or without ZeRO-1, and on another EP size.
TT="--batch 4 --seq 32 --steps 6 --threads 1 --sample 0 --val-every 3 --warmup 2 --save-every 3 --keep 0 --seconds 0"
one() { local prog=$1; shift # one PROG ARGS: $tmp/PROG_self, its output in $tmp/last.txt
    "$tmp/${prog}_self" "$@" >"$tmp/last.txt" 2>&1 || { echo "     $prog $*: exit $?"; tail -n 3 "$tmp/last.txt"; }; }
ranks() { local prog=$1 np=$2; shift 2 # ranks PROG NP ARGS: $tmp/PROG_mpi under mpirun
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 timeout 300 \
        mpirun -np "$np" --oversubscribe --bind-to none "$tmp/${prog}_mpi" "$@" >"$tmp/last.txt" 2>&1 ||
        { echo "     mpirun -np $np $prog $*: exit $?"; tail -n 3 "$tmp/last.txt"; }; }
run1() { one tt $TT "$@"; }
runp() { local np=$1; shift; ranks tt "$np" $TT "$@"; }
same() { # same NAME FILE1 FILE2
    if [ -f "$2" ] && [ -f "$3" ] && cmp -s "$2" "$3"; then echo "ok   $1"; echo "     cmp $2 $3: identical ($(wc -c <"$2") bytes)"; pass=$((pass + 1))
    else echo "FAIL $1"; echo "     cmp $2 $3: $(cmp "$2" "$3" 2>&1 | head -n 1)"; fail=$((fail + 1)); fi; }
if bash data/prepare.sh >/dev/null 2>&1 && $CC $W -march=native -fopenmp examples/train_tiny.c -o "$tmp/tt_self" -lm &&
    mpicc $W -march=native -fopenmp -DMOE_MPI examples/train_tiny.c -o "$tmp/tt_mpi" -lm; then
    d=$tmp/dp
    echo "== data parallelism: train_tiny, one process against mpirun"
    run1 --accum 2 --out "$d/p1a2";                 runp 2 --accum 2 --out "$d/p2a2"
    same "DP 2 ranks = 1 process, fp32 (step 3)" "$d/p1a2/ckpt-00000003.bin" "$d/p2a2/ckpt-00000003.bin"
    same "DP 2 ranks = 1 process, fp32 (step 6)" "$d/p1a2/ckpt-00000006.bin" "$d/p2a2/ckpt-00000006.bin"
    runp 2 --accum 2 --out "$d/p2a2again"
    same "the same 2-rank run twice" "$d/p2a2/ckpt-00000006.bin" "$d/p2a2again/ckpt-00000006.bin"
    run1 --accum 4 --out "$d/p1a4";                 runp 4 --accum 4 --out "$d/p4a4"
    same "DP 4 ranks = 1 process, fp32 (rank-ordered sums)" "$d/p1a4/ckpt-00000006.bin" "$d/p4a4/ckpt-00000006.bin"
    run1 --accum 2 --precision bf16 --out "$d/b1";  runp 2 --accum 2 --precision bf16 --out "$d/b2"
    same "DP 2 ranks = 1 process, bf16" "$d/b1/ckpt-00000006.bin" "$d/b2/ckpt-00000006.bin"
    # ranks whose CPUs would pick different BF16 GEMM kernels (AMX or vdpbf16ps where there are,
    # FP32 FMAs elsewhere; set here per rank by MPMD mpirun) all take the lowest, FP32 FMAs: the
    # bytes of one process on FMAs
    MOE_GEMM_BF16=amx one tt $TT --accum 2 --precision bf16 --out "$d/bbest"
    MOE_GEMM_BF16=fma one tt $TT --accum 2 --precision bf16 --out "$d/bfma"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 timeout 300 mpirun --oversubscribe --bind-to none \
        -np 1 -x MOE_GEMM_BF16=amx "$tmp/tt_mpi" $TT --accum 2 --precision bf16 --out "$d/bmix" : \
        -np 1 -x MOE_GEMM_BF16=fma "$tmp/tt_mpi" $TT --accum 2 --precision bf16 --out "$d/bmix" >"$tmp/last.txt" 2>&1 ||
        { echo "     mpirun (MPMD, MOE_GEMM_BF16 amx and fma): exit $?"; tail -n 3 "$tmp/last.txt"; }
    same "DP 2 ranks, BF16 kernels the best there is (rank 0) and FMA (rank 1) = 1 process on FMA" "$d/bfma/ckpt-00000006.bin" "$d/bmix/ckpt-00000006.bin"
    cmp -s "$d/bbest/ckpt-00000006.bin" "$d/bfma/ckpt-00000006.bin" && echo "     (one process on the best kernel and on FMA: the same bytes; this build has FMA only)" ||
        echo "     (one process on the best kernel and on FMA: different bytes, so the ranks' kernels mattered)"
    runp 2 --accum 4 --out "$d/p2a4";               runp 2 --accum 4 --out "$d/p2a4again"
    same "2 ranks with 2 micro-batches each (accumulated, then summed over ranks), twice" "$d/p2a4/ckpt-00000006.bin" \
        "$d/p2a4again/ckpt-00000006.bin"
    run1 --resume "$d/p2a2/ckpt-00000003.bin" --out "$d/r21"
    same "a 2-rank checkpoint resumed on 1 process" "$d/p1a2/ckpt-00000006.bin" "$d/r21/ckpt-00000006.bin"
    runp 2 --resume "$d/p1a2/ckpt-00000003.bin" --out "$d/r12"
    same "a 1-process checkpoint resumed on 2 ranks" "$d/p1a2/ckpt-00000006.bin" "$d/r12/ckpt-00000006.bin"
    run1 --resume "$d/p4a4/ckpt-00000003.bin" --out "$d/r41"
    same "a 4-rank checkpoint resumed on 1 process" "$d/p1a4/ckpt-00000006.bin" "$d/r41/ckpt-00000006.bin"
    # ZeRO-1: the moments sharded over the ranks, the gradients reduce-scattered to the shards,
    # the parameters all-gathered: the same bytes again, and checkpoints that move between
    # sharded and unsharded runs
    runp 2 --accum 2 --zero 1 --out "$d/z2"
    same "DP+ZeRO-1 2 ranks = 1 process, fp32 (step 3)" "$d/p1a2/ckpt-00000003.bin" "$d/z2/ckpt-00000003.bin"
    same "DP+ZeRO-1 2 ranks = 1 process, fp32 (step 6)" "$d/p1a2/ckpt-00000006.bin" "$d/z2/ckpt-00000006.bin"
    runp 4 --accum 4 --zero 1 --out "$d/z4"
    same "DP+ZeRO-1 4 ranks = 1 process, fp32" "$d/p1a4/ckpt-00000006.bin" "$d/z4/ckpt-00000006.bin"
    run1 --accum 2 --precision bf16 --moments bf16 --out "$d/zb1"; runp 2 --accum 2 --precision bf16 --moments bf16 --zero 1 --out "$d/zb2"
    same "DP+ZeRO-1 2 ranks = 1 process, bf16 (bf16 moments)" "$d/zb1/ckpt-00000006.bin" "$d/zb2/ckpt-00000006.bin"
    run1 --resume "$d/z4/ckpt-00000003.bin" --accum 4 --out "$d/rz41"
    same "a 4-rank ZeRO-1 checkpoint resumed on 1 process" "$d/p1a4/ckpt-00000006.bin" "$d/rz41/ckpt-00000006.bin"
    runp 2 --resume "$d/p1a2/ckpt-00000003.bin" --zero 1 --out "$d/rz12"
    same "a 1-process checkpoint resumed on 2 ranks with ZeRO-1" "$d/p1a2/ckpt-00000006.bin" "$d/rz12/ckpt-00000006.bin"
    zline=$(grep -h "^ZeRO-1: AdamW moments" "$d/rz12/rank-1.log" 2>/dev/null)
    if echo "$zline" | awk '{ if ($4 > 0 && $4 < 0.6 * substr($9, 2)) ok = 1 } END { exit !ok }'; then
        echo "ok   ZeRO-1 holds about half the moments on each of 2 ranks: $zline"; pass=$((pass + 1))
    else echo "FAIL ZeRO-1's memory per rank: '$zline'"; fail=$((fail + 1)); fi
    # expert parallelism: each MoE layer's rows go to the ranks that own their experts and
    # come back; the experts' weight gradients are added over the source ranks in rank order
    runp 2 --accum 2 --ep 2 --out "$d/e2"
    same "EP=2 on 2 ranks = 1 process, fp32" "$d/p1a2/ckpt-00000006.bin" "$d/e2/ckpt-00000006.bin"
    runp 4 --accum 4 --ep 4 --out "$d/e4"
    same "EP=4 on 4 ranks = 1 process, fp32" "$d/p1a4/ckpt-00000006.bin" "$d/e4/ckpt-00000006.bin"
    runp 4 --accum 4 --ep 2 --out "$d/e22"
    same "EP=2 x DP=2 on 4 ranks = 1 process, fp32" "$d/p1a4/ckpt-00000006.bin" "$d/e22/ckpt-00000006.bin"
    runp 4 --accum 4 --ep 2 --zero 1 --out "$d/e22z"
    same "EP=2 x DP=2 with ZeRO-1 = 1 process, fp32" "$d/p1a4/ckpt-00000006.bin" "$d/e22z/ckpt-00000006.bin"
    runp 2 --accum 2 --ep 2 --precision bf16 --out "$d/eb2"
    same "EP=2 = 1 process, bf16" "$d/b1/ckpt-00000006.bin" "$d/eb2/ckpt-00000006.bin"
    run1 --accum 2 --precision fp8 --out "$d/f1"; runp 2 --accum 2 --ep 2 --precision fp8 --out "$d/ef2"
    same "EP=2 = 1 process, fp8 (the V3 recipe)" "$d/f1/ckpt-00000006.bin" "$d/ef2/ckpt-00000006.bin"
    runp 4 --resume "$d/e4/ckpt-00000003.bin" --ep 2 --out "$d/re42"
    same "an EP=4 checkpoint resumed with EP=2 x DP=2" "$d/p1a4/ckpt-00000006.bin" "$d/re42/ckpt-00000006.bin"
    run1 --resume "$d/e22/ckpt-00000003.bin" --accum 4 --out "$d/re21"
    same "an EP=2 x DP=2 checkpoint resumed on 1 process" "$d/p1a4/ckpt-00000006.bin" "$d/re21/ckpt-00000006.bin"
    runp 2 --resume "$d/p1a2/ckpt-00000003.bin" --ep 2 --out "$d/re12"
    same "a 1-process checkpoint resumed with EP=2" "$d/p1a2/ckpt-00000006.bin" "$d/re12/ckpt-00000006.bin"
    runp 2 --accum 2 --ep 2 --steps 4 --inject nan-loss@2 --out "$d/enan"
    if grep -q "step 2 skipped: another rank's loss is not finite" "$d/enan/rank-1.log" && [ -f "$d/enan/ckpt-00000004.bin" ]; then
        echo "ok   EP=2, rank 0's loss alone not finite: both ranks skip the step together and finish"; pass=$((pass + 1))
    else echo "FAIL EP=2 with one rank's loss not finite: $(tail -n 2 "$tmp/last.txt")"; fail=$((fail + 1)); fi
    runp 4 --accum 4 --ep 3 --out "$d/bad"
    if grep -q "does not divide the 4 ranks" "$tmp/last.txt"; then echo "ok   --ep 3 on 4 ranks is refused"; pass=$((pass + 1))
    else echo "FAIL --ep 3 on 4 ranks: $(tail -n 2 "$tmp/last.txt")"; fail=$((fail + 1)); fi
    # a rank killed mid-run: the job ends with an error (no hang), and --resume auto on the
    # same ranks finishes with the bytes of an uninterrupted run
    K="--accum 2 --steps 40 --save-every 5"
    run1 $K --out "$d/k1"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 timeout 120 \
        mpirun -np 2 --oversubscribe --bind-to none "$tmp/tt_mpi" $TT $K --out "$d/k2" >"$tmp/kill.txt" 2>&1 &
    mpid=$!
    for i in $(seq 1 600); do [ -f "$d/k2/ckpt-00000010.bin" ] && break; sleep 0.05; done
    victim=$(pgrep -f "^$tmp/tt_mpi .*--out $d/k2" | tail -n 1) # a rank, not mpirun or timeout
    t0=$(date +%s)
    [ -n "$victim" ] && kill -9 "$victim"
    wait "$mpid"; rc=$?
    if [ -n "$victim" ] && [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ ! -f "$d/k2/ckpt-00000040.bin" ]; then
        echo "ok   a rank killed with SIGKILL after step 10: mpirun ends (exit $rc) $(($(date +%s) - t0)) s later"; pass=$((pass + 1))
    else
        echo "FAIL a rank killed mid-run: victim '${victim}', mpirun exit $rc (124: a hang), final checkpoint $(ls "$d/k2" | grep -c 00000040)"
        fail=$((fail + 1))
    fi
    runp 2 --accum 2 --steps 40 --save-every 5 --resume auto --out "$d/k2"
    same "after the kill, --resume auto on 2 ranks = the uninterrupted run" "$d/k1/ckpt-00000040.bin" "$d/k2/ckpt-00000040.bin"
    # rank 0 alone fails to write a checkpoint (a directory in the way of ckpt-00000003.bin):
    # every rank stops with an error, rank 0 saying why (before the others can exit), the
    # others that it was rank 0 (not only killed by mpirun)
    rm -rf "$d/wf" && mkdir -p "$d/wf/ckpt-00000003.bin/in-the-way"
    runp 2 --accum 2 --out "$d/wf"
    if grep -q "rank 0 could not write the checkpoint of step 3" "$d/wf/rank-1.log" 2>/dev/null &&
        grep -q "^train_tiny: could not write the checkpoint of step 3: MOE_ERR_IO: " "$tmp/last.txt"; then
        echo "ok   rank 0's failed checkpoint write stops rank 1 too, with its reason"; pass=$((pass + 1))
    else echo "FAIL rank 0's failed write: rank 0 says '$(grep "could not" "$tmp/last.txt")', rank 1 '$(tail -n 2 "$d/wf/rank-1.log" 2>/dev/null)'"
        fail=$((fail + 1)); fi
    # the same at the start, before any step: a directory in the way of the log rank 0 alone
    # writes (OUT/log.csv). Both ranks must stop with status 1 within 60 s of the start (the
    # failure comes before the first step: 1-3 s here, the rest is margin for a loaded
    # machine; runp's limit of 300 s would catch a hang), rank 0 printing its reason, rank 1
    # that rank 0 could not write the log.
    rm -rf "$d/wl" && mkdir -p "$d/wl/log.csv/in-the-way"
    t0=$(date +%s)
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 timeout 300 \
        mpirun -np 2 --oversubscribe --bind-to none "$tmp/tt_mpi" $TT --accum 2 --out "$d/wl" >"$tmp/last.txt" 2>&1
    rc=$? el=$(($(date +%s) - t0))
    if grep -q "^train_tiny: could not write $d/wl/log.csv: MOE_ERR_IO: Is a directory" "$tmp/last.txt" &&
        grep -q "rank 0 could not write $d/wl/log.csv: stopping" "$d/wl/rank-1.log" 2>/dev/null && [ "$rc" = 1 ] && [ "$el" -lt 60 ]; then
        echo "ok   rank 0 cannot write OUT/log.csv at the start: both ranks stop, mpirun exit 1 after $el s, rank 0 saying why"; pass=$((pass + 1))
    else echo "FAIL rank 0's failed log at the start: mpirun exit $rc after $el s; rank 0 says '$(grep "could not" "$tmp/last.txt")', rank 1 '$(tail -n 2 "$d/wl/rank-1.log" 2>/dev/null)'"
        fail=$((fail + 1)); fi
    runp 2 --accum 3 --out "$d/bad"
    if grep -q "do not split over 2 ranks" "$tmp/last.txt"; then echo "ok   --accum 3 on 2 ranks is refused"; pass=$((pass + 1))
    else echo "FAIL --accum 3 on 2 ranks: $(tail -n 2 "$tmp/last.txt")"; fail=$((fail + 1)); fi
else
    echo "FAIL train_tiny does not build (plain and mpicc -DMOE_MPI)"; fail=$((fail + 1))
fi

# ---- distillation under mpirun: examples/distill (teacher, scratch and distilled students) ----
# 4 steps each of 2 x 32-byte micro-batches, --accum P: P ranks write one process's files
DD="--teacher-steps 4 --steps 4 --batch 2 --seq 32 --val-batches 1 --save-every 2 --keep 0 --threads 1 --warmup 1"
drun1() { one di $DD "$@"; }
drunp() { local np=$1; shift; ranks di "$np" $DD "$@"; }
if $CC $W -march=native -fopenmp examples/distill.c -o "$tmp/di_self" -lm &&
    mpicc $W -march=native -fopenmp -DMOE_MPI examples/distill.c -o "$tmp/di_mpi" -lm; then
    d=$tmp/di
    echo "== distillation: examples/distill, one process against mpirun"
    drun1 --accum 2 --out "$d/p1"; drunp 2 --accum 2 --out "$d/p2"
    for f in teacher.ckpt scratch-00000004.bin distilled-00000004.bin; do
        same "distill, 2 ranks = 1 process: $f" "$d/p1/$f" "$d/p2/$f"
    done
    rm -rf "$d/wf" && mkdir -p "$d/wf/teacher-00000002.bin/in-the-way" # rank 0 alone cannot write a checkpoint
    drunp 2 --accum 2 --out "$d/wf"
    if grep -q "rank 0 could not write the teacher checkpoint of step 2" "$d/wf/rank-1.log" 2>/dev/null &&
        grep -q "^distill: could not write the teacher checkpoint of step 2: MOE_ERR_IO: " "$tmp/last.txt"; then
        echo "ok   distill: rank 0's failed checkpoint write stops rank 1 too, with its reason"; pass=$((pass + 1))
    else echo "FAIL distill, rank 0's failed write: rank 1 says '$(tail -n 2 "$d/wf/rank-1.log" 2>/dev/null)'"; fail=$((fail + 1)); fi
    drunp 2 --accum 2 --zero 1 --ep 2 --out "$d/p2ze"
    same "distill with ZeRO-1 and EP=2 = 1 process: the distilled student" "$d/p1/distilled-00000004.bin" "$d/p2ze/distilled-00000004.bin"
    drun1 --accum 4 --out "$d/p1a4"; drunp 4 --accum 4 --ep 2 --zero 1 --out "$d/p4"
    same "distill, EP=2 x DP=2 with ZeRO-1 = 1 process: the teacher" "$d/p1a4/teacher.ckpt" "$d/p4/teacher.ckpt"
    same "distill, EP=2 x DP=2 with ZeRO-1 = 1 process: the distilled student" "$d/p1a4/distilled-00000004.bin" "$d/p4/distilled-00000004.bin"
    drun1 --accum 2 --offline --out "$d/o1"; drunp 2 --accum 2 --offline --ep 2 --out "$d/o2"
    same "distill from the top-k cache, 2 ranks = 1 process: the cache rank 0 wrote" "$d/o1/teacher_topk.cache" "$d/o2/teacher_topk.cache"
    same "distill from the top-k cache, 2 ranks = 1 process: the student" "$d/o1/distill-kc-00000004.bin" "$d/o2/distill-kc-00000004.bin"
    rm -rf "$d/wc" && mkdir -p "$d/wc/teacher_topk.cache/in-the-way" # rank 0 alone cannot write the top-k cache
    drunp 2 --accum 2 --offline --out "$d/wc"
    if grep -q "rank 0 could not write $d/wc/teacher_topk.cache" "$d/wc/rank-1.log" 2>/dev/null &&
        grep -q "^distill: could not write $d/wc/teacher_topk.cache: " "$tmp/last.txt"; then
        echo "ok   distill: rank 0's failed top-k cache write stops rank 1 too, with its reason"; pass=$((pass + 1))
    else echo "FAIL distill, rank 0's failed cache write: rank 1 says '$(tail -n 2 "$d/wc/rank-1.log" 2>/dev/null)'"; fail=$((fail + 1)); fi
    drun1 --accum 2 --inject nan-loss@2 --out "$d/n1"; drunp 2 --accum 2 --ep 2 --inject nan-loss@2 --out "$d/n2"
    same "distill with EP=2, rank 0's loss alone not finite at step 2 (skipped together) = 1 process" \
        "$d/n1/distilled-00000004.bin" "$d/n2/distilled-00000004.bin"
    cp -r "$d/p2ze" "$d/r21"; rm -f "$d/r21/distilled-00000004.bin"
    drun1 --accum 2 --resume auto --out "$d/r21"
    same "distill: a 2-rank (ZeRO-1, EP) run resumed on 1 process" "$d/p1/distilled-00000004.bin" "$d/r21/distilled-00000004.bin"
    cp -r "$d/p1" "$d/r12"; rm -f "$d/r12/distilled-00000004.bin"
    drunp 2 --accum 2 --zero 1 --ep 2 --resume auto --out "$d/r12"
    same "distill: a 1-process run resumed on 2 ranks (ZeRO-1, EP)" "$d/p1/distilled-00000004.bin" "$d/r12/distilled-00000004.bin"
else
    echo "FAIL distill does not build (plain and mpicc -DMOE_MPI)"; fail=$((fail + 1))
fi
echo "SUITE: $pass passed, $fail failed"
[ "$fail" = 0 ]

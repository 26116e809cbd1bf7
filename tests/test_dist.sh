#!/usr/bin/env bash
# tests/test_dist.sh CC — the communicator's suite (tests/test_dist.c) on one process (SELF,
# built with CC) and under Open MPI with 1, 2, 3 and 4 ranks (mpicc -DMOE_MPI; more ranks
# than cores, one OpenMP thread each, as environment.md measured). Each run is a SUITE of its
# own; this adds them up. A run that hangs is stopped after 300 s and counts as failed.
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
    # a rank that dies before a collective: the job must end with an error, not hang
    echo "== mpirun -np 3, rank 1 exits before the first collective"
    t0=$(date +%s)
    MOE_TEST_DIE_RANK=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
        timeout 60 mpirun -np 3 --oversubscribe --bind-to none "$tmp/dist_mpi" >"$tmp/die.txt" 2>&1
    rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then
        echo "ok   a dead rank ends the job: mpirun exit $rc after $(($(date +%s) - t0)) s"; pass=$((pass + 1))
    else
        echo "FAIL a dead rank: mpirun exit $rc (124: still running after 60 s)"; fail=$((fail + 1))
    fi
else
    echo "FAIL test_dist.c does not compile with mpicc -DMOE_MPI"; fail=$((fail + 1))
fi
echo "SUITE: $pass passed, $fail failed"
[ "$fail" = 0 ]

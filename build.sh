#!/usr/bin/env bash
# build.sh — the one entry point of moe.h.
#
#   ./build.sh                  build every C target into build/ (and, when nvcc is present, the
#                               CUDA implementation for sm_90a with the strict flags, linked from C)
#   ./build.sh cuda             the CUDA binaries into build/cuda/: train_tiny, generate, the table
#                               test, the conversion check, bench/gpu.cu (tests/gpu/run.sh runs them)
#   ./build.sh test [SUITE]     build and run every test suite (or one); the last line is
#                               "N passed, M failed" over all test cases; exit 0 only if M = 0
#   ./build.sh bench [NAME]     run bench/NAME.c (all benches without NAME)
#   ./build.sh example NAME [--np P] [ARGS]   build and run examples/NAME.c (--np: P ranks, mpirun)
#   ./build.sh run              the main job: train the tiny model (examples/train_tiny.c);
#                               --np P first: P ranks under mpirun (--ep N, --zero 1)
#   ./build.sh torture          kill -9 a training run 20 times; the resumed result must be identical
#   ./build.sh fuzz [TARGET] [SECONDS]   libFuzzer on the file parsers (tests/fuzz/; all targets,
#                               60 s each by default; SECONDS 0 = no limit; FUZZ_RUNS=N stops each
#                               after N executions); corpus in build/fuzz/corpus, crashes in
#                               build/fuzz/crashes
#
# Environment: CC (default gcc), NATIVE=0 to build without -march=native.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
BUILD="$ROOT/build"
mkdir -p "$BUILD"

CC=${CC:-gcc}
NATIVE=${NATIVE:-1}
WARN="-Wall -Wextra -Wpedantic -Werror"
BASE="-std=c99 -ffp-contract=off $WARN -I$ROOT"
OPT="-O3"
[ "$NATIVE" = 1 ] && OPT="$OPT -march=native"
OMP=""
if echo 'int main(void){return 0;}' | $CC -fopenmp -x c - -o "$BUILD/.omp_probe" >/dev/null 2>&1; then OMP="-fopenmp"; fi
LIBS="-lm"

log() { printf '%s\n' "$*" >&2; }

# Install a Debian package when a file it provides is missing (we run as root in CI).
need_pkg() { # need_pkg FILE-OR-COMMAND PACKAGE...
    local probe=$1; shift
    if [ -e "$probe" ] || command -v "$probe" >/dev/null 2>&1; then return 0; fi
    log "installing $* ..."
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get install -y -q "$@" >/dev/null 2>&1 || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "$@" >/dev/null; }
}

# compile OUT SRC [extra flags...]
compile() {
    local out=$1 src=$2; shift 2
    $CC $BASE $OPT $OMP "$@" "$src" -o "$out" $LIBS
}

# ---- the CUDA build (../shared/reference/gpu.md §7.1) -------------------------------------
# sm_90a; warnings are errors; every kernel with launch bounds and an explicit stream; no
# register spills or local memory; no FMA contraction on either side (--fmad=false and
# -ffp-contract=off), so the element-wise kernels give the CPU's bits. The implementation
# compiles once into build/moe_cuda.o, which C compiled by gcc links against (tests/cuda_link.c).
NVCC_FLAGS="-std=c++17 -gencode arch=compute_90a,code=sm_90a -O3 --fmad=false -Xcompiler -ffp-contract=off
    --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror --Wdefault-stream-launch --Wmissing-launch-bounds
    -Xptxas -warn-spills,-warn-lmem-usage,-Werror -I$ROOT -DMOE_CUDA"
[ "$NATIVE" = 1 ] && NVCC_FLAGS="$NVCC_FLAGS -Xcompiler -march=native"
have_nvcc() { command -v nvcc >/dev/null 2>&1; }
cuda_libs() {
    local libs="-lcublasLt -lcudart"
    [ -e "$(dirname "$(command -v nvcc)")/../lib64/libnccl.so" ] && libs="$libs -lnccl"
    echo "$libs"
}
# The flags that compile in the NCCL communicator (MOE_NCCL) and link NCCL: the toolkit's own
# (then cuda_libs links it), else a pip wheel's (nvidia-nccl-cu*, as on the GPU machines);
# fails when neither is there.
nccl_flags() {
    local cuda p lib
    cuda=$(dirname "$(command -v nvcc)")/..
    if [ -e "$cuda/include/nccl.h" ] && [ -e "$cuda/lib64/libnccl.so" ]; then echo "-DMOE_NCCL"; return 0; fi
    p=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null) || return 1
    lib=$(ls "$p"/lib/libnccl.so* 2>/dev/null | head -n 1)
    [ -e "$p/include/nccl.h" ] && [ -n "$lib" ] || return 1
    echo "-DMOE_NCCL -I$p/include -L$p/lib -Xlinker -l:$(basename "$lib") -Xlinker -rpath=$p/lib"
}
# Open MPI's compile and link flags as nvcc takes them (-I, -L, -l as they are, the rest to gcc;
# after the sources, so that the linker keeps the libraries).
mpi_nvcc_flags() {
    local f out=""
    for f in $(mpicc --showme:compile) $(mpicc --showme:link); do
        case $f in -I*|-L*|-l*) out="$out $f" ;; *) out="$out -Xcompiler $f" ;; esac
    done
    echo "$out"
}
# nvcc_compile OUT SRC [flags]: a C program that holds the implementation, as CUDA C++
nvcc_compile() {
    local out=$1 src=$2; shift 2
    nvcc $NVCC_FLAGS -x cu "$@" "$src" -o "$out" $(cuda_libs)
}
build_cuda_lib() {
    have_nvcc || { log "nvcc not found: skipping the CUDA build"; return 0; }
    nvcc $NVCC_FLAGS -x cu -c tests/cuda_impl.cu -o "$BUILD/moe_cuda.o"
    $CC $BASE $OPT -DMOE_CUDA -c tests/cuda_link.c -o "$BUILD/cuda_link.o"
    nvcc "$BUILD/cuda_link.o" "$BUILD/moe_cuda.o" -o "$BUILD/cuda_link" $(cuda_libs)
}
cmd_cuda() {
    have_nvcc || { log "nvcc not found: no CUDA build"; return 1; }
    mkdir -p "$BUILD/cuda"
    build_cuda_lib
    nvcc_compile "$BUILD/cuda/train_tiny" examples/train_tiny.c &
    nvcc_compile "$BUILD/cuda/generate" examples/generate.c &
    wait
    nvcc_compile "$BUILD/cuda/test_backend" tests/test_backend.c &
    nvcc $NVCC_FLAGS tests/gpu/conversions.cu -o "$BUILD/cuda/gpu_conversions" $(cuda_libs) &
    nvcc $NVCC_FLAGS bench/gpu.cu -o "$BUILD/cuda/bench_gpu" $(cuda_libs) &
    wait
    # the NCCL communicator's test (one process; tests/gpu/run.sh runs its nranks = 1 smoke test)
    local nf
    if nf=$(nccl_flags); then nvcc $NVCC_FLAGS tests/test_nccl.cu -o "$BUILD/cuda/test_nccl" $nf $(cuda_libs)
    else log "NCCL not found (toolkit or pip wheel): build/cuda/test_nccl not built"; fi
}

build_all() {
    local f name
    for f in tests/test_*.c; do
        name=$(basename "$f" .c)
        case $name in
            test_gradcheck|test_distill) compile "$BUILD/$name" "$f" -DMOE_REAL_F64 ;;
            *) compile "$BUILD/$name" "$f" ;;
        esac
    done
    for f in examples/*.c; do
        [ -e "$f" ] || continue
        compile "$BUILD/$(basename "$f" .c)" "$f"
    done
    compile "$BUILD/parity_tool" tests/parity/parity_tool.c
    for f in bench/*.c; do
        [ "$(basename "$f")" = gemm.c ] && continue # needs OpenBLAS: built by ./build.sh bench
        compile "$BUILD/bench_$(basename "$f" .c)" "$f"
    done
    build_cuda_lib
}

# ---- tests -------------------------------------------------------------------------------
PASSED=0
FAILED=0
# run_suite NAME CMD...: run a suite program, echo its output, add up its SUITE line.
run_suite() {
    local name=$1; shift
    local out rc=0 line p f
    log "== suite $name"
    out=$("$@" 2>&1) || rc=$?
    printf '%s\n' "$out"
    line=$(printf '%s\n' "$out" | grep -E '^SUITE: [0-9]+ passed, [0-9]+ failed$' | tail -n 1 || true)
    if [ -z "$line" ]; then
        log "suite $name did not finish (exit $rc): counted as one failed case"
        FAILED=$((FAILED + 1))
        return
    fi
    p=$(echo "$line" | sed -E 's/^SUITE: ([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed$/\1/')
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; fi
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
}

suite_unit() { # unit suites: one program each
    local s=$1
    local flags=""
    case $s in gradcheck|distill) flags="-DMOE_REAL_F64" ;; esac
    if ! compile "$BUILD/test_$s" "tests/test_$s.c" $flags; then
        log "suite $s does not compile: counted as one failed case"
        FAILED=$((FAILED + 1))
        return
    fi
    run_suite "$s" "$BUILD/test_$s"
}

suite_compile() { bash tests/compile_matrix.sh "$CC"; }

suite_cuda() {
    # The CUDA build on this machine, GPU or not: C linked against the nvcc implementation, the
    # device plumbing, the CUDA table and the MOE_HD math compiled by nvcc vs gcc.
    if ! have_nvcc; then log "cuda: skipped (nvcc not found)"; return; fi
    if ! build_cuda_lib; then log "suite cuda does not compile: counted as one failed case"; FAILED=$((FAILED + 1)); return; fi
    run_suite cuda_link "$BUILD/cuda_link"
    if ! $CC $BASE $OPT -c tests/cuda_hd_ref.c -o "$BUILD/cuda_hd_ref.o" ||
        ! nvcc $NVCC_FLAGS tests/test_cuda_host.cu "$BUILD/cuda_hd_ref.o" -o "$BUILD/test_cuda_host" $(cuda_libs); then
        log "suite cuda_host does not compile: counted as one failed case"; FAILED=$((FAILED + 1)); return
    fi
    run_suite cuda_host "$BUILD/test_cuda_host"
    # The NCCL communicator (MOE_NCCL) on the host: its table, refusals, error messages and the
    # id bootstrap over MPI, file: and tcp: between two ranks (tests/test_nccl.cu).
    local nf
    if ! nf=$(nccl_flags); then log "cuda_nccl: skipped (no NCCL headers and library)"; return; fi
    if command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1; then
        if ! nvcc $NVCC_FLAGS -DMOE_MPI tests/test_nccl.cu -o "$BUILD/test_nccl" $nf $(mpi_nvcc_flags) $(cuda_libs); then
            log "suite cuda_nccl does not compile: counted as one failed case"; FAILED=$((FAILED + 1)); return
        fi
        run_suite cuda_nccl env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
            timeout 120 mpirun -np 2 --oversubscribe --bind-to none "$BUILD/test_nccl"
    else
        if ! nvcc $NVCC_FLAGS tests/test_nccl.cu -o "$BUILD/test_nccl" $nf $(cuda_libs); then
            log "suite cuda_nccl does not compile: counted as one failed case"; FAILED=$((FAILED + 1)); return
        fi
        run_suite cuda_nccl "$BUILD/test_nccl"
    fi
}
suite_gpu() {
    # Where an NVIDIA GPU is present: the table test with the CUDA backend against the CPU's
    # references (tests/gpu/run.sh has the rest: conversions, training, sanitizer, bench).
    if ! have_nvcc || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo "gpu: skipped (no CUDA device)"; return; fi
    mkdir -p "$BUILD/cuda"
    if ! nvcc_compile "$BUILD/cuda/test_backend" tests/test_backend.c; then
        log "suite gpu does not compile: counted as one failed case"; FAILED=$((FAILED + 1)); return
    fi
    run_suite gpu "$BUILD/cuda/test_backend" --device cuda
}

suite_sanitize() {
    # The unit suites again, under AddressSanitizer + UndefinedBehaviorSanitizer.
    local san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    local s flags
    for s in $UNIT_SUITES; do
        flags=""; case $s in gradcheck|distill) flags="-DMOE_REAL_F64" ;; esac
        if ! $CC $BASE -O1 -g $OMP $san $flags "tests/test_$s.c" -o "$BUILD/asan_$s" $LIBS; then
            log "suite asan:$s does not compile"; FAILED=$((FAILED + 1)); continue
        fi
        ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 MOE_TEST_QUICK=1 run_suite "asan:$s" "$BUILD/asan_$s"
    done
}

suite_parity() {
    # External oracles: Hugging Face transformers + PyTorch, ml_dtypes (a cached venv).
    bash data/prepare.sh >&2
    if ! compile "$BUILD/parity_tool" tests/parity/parity_tool.c || ! compile "$BUILD/train_tiny" examples/train_tiny.c; then
        log "parity tools do not compile"; FAILED=$((FAILED + 1)); return
    fi
    run_suite parity bash tests/parity/run.sh
}

# ---- fuzzing (tests/fuzz) ------------------------------------------------------------------
FUZZ_TARGETS="safetensors config ckpt data distill hf_index hf_weights"
FUZZ_DIR="$BUILD/fuzz"

# Build every fuzz target (clang, libFuzzer, ASan + UBSan) and the seed corpus. The
# implementation is compiled once into moe_impl.o; everything is rebuilt only when older than
# its sources. Installs clang and libclang-rt-14-dev when missing.
build_fuzz() {
    local fl t src
    need_pkg clang clang
    mkdir -p "$FUZZ_DIR/bin"
    if ! echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' |
        clang -fsanitize=fuzzer -x c - -o "$FUZZ_DIR/.probe" >/dev/null 2>&1; then
        need_pkg /nonexistent-libfuzzer-probe libclang-rt-14-dev
    fi
    fl="-std=c99 -O1 -g -ffp-contract=off $WARN -I$ROOT -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -fno-omit-frame-pointer
        -fno-sanitize-recover=undefined"
    if [ ! -e "$FUZZ_DIR/moe_impl.o" ] || [ moe.h -nt "$FUZZ_DIR/moe_impl.o" ] || [ tests/fuzz/moe_impl.c -nt "$FUZZ_DIR/moe_impl.o" ]; then
        log "fuzz: compiling moe.h with ASan + UBSan + libFuzzer coverage"
        clang $fl -fsanitize=fuzzer-no-link,address,undefined -c tests/fuzz/moe_impl.c -o "$FUZZ_DIR/moe_impl.o"
    fi
    for t in $FUZZ_TARGETS; do
        src=tests/fuzz/fuzz_$t.c
        if [ ! -e "$FUZZ_DIR/bin/fuzz_$t" ] || [ "$src" -nt "$FUZZ_DIR/bin/fuzz_$t" ] ||
            [ tests/fuzz/fuzz_common.h -nt "$FUZZ_DIR/bin/fuzz_$t" ] || [ "$FUZZ_DIR/moe_impl.o" -nt "$FUZZ_DIR/bin/fuzz_$t" ]; then
            clang $fl -fsanitize=fuzzer,address,undefined "$src" "$FUZZ_DIR/moe_impl.o" -o "$FUZZ_DIR/bin/fuzz_$t" -lm
        fi
    done
    # the seeds: regenerated (into a fresh directory, then swapped in) only when the generator
    # or moe.h changed, so that a campaign running in the background keeps reading whole sets
    if [ ! -e "$FUZZ_DIR/gen_corpus" ] || [ moe.h -nt "$FUZZ_DIR/gen_corpus" ] || [ tests/fuzz/gen_corpus.c -nt "$FUZZ_DIR/gen_corpus" ] ||
        [ tests/fuzz/fuzz_common.h -nt "$FUZZ_DIR/gen_corpus" ]; then
        compile "$FUZZ_DIR/gen_corpus" tests/fuzz/gen_corpus.c
    fi
    if [ ! -e "$FUZZ_DIR/seeds.stamp" ] || [ "$FUZZ_DIR/gen_corpus" -nt "$FUZZ_DIR/seeds.stamp" ]; then
        rm -rf "$FUZZ_DIR/new"
        "$FUZZ_DIR/gen_corpus" "$FUZZ_DIR/new" >&2
        rm -rf "$FUZZ_DIR/seeds.old" "$FUZZ_DIR/dict.old"
        [ -d "$FUZZ_DIR/seeds" ] && mv "$FUZZ_DIR/seeds" "$FUZZ_DIR/seeds.old"
        [ -d "$FUZZ_DIR/dict" ] && mv "$FUZZ_DIR/dict" "$FUZZ_DIR/dict.old"
        mv "$FUZZ_DIR/new/seeds" "$FUZZ_DIR/seeds"
        mv "$FUZZ_DIR/new/dict" "$FUZZ_DIR/dict"
        rm -rf "$FUZZ_DIR/new" "$FUZZ_DIR/seeds.old" "$FUZZ_DIR/dict.old"
        touch "$FUZZ_DIR/seeds.stamp"
    fi
}

# fuzz_run TARGET SECONDS CORPUS [extra libFuzzer flags]: one libFuzzer session on CORPUS (new
# inputs go there) plus the seeds; prints "<execs> <seconds> <crashes>" last.
fuzz_run() {
    local t=$1 secs=$2 corpus=$3; shift 3
    local crashes="$FUZZ_DIR/crashes/$t" log t0 t1 rc=0 execs dict="$FUZZ_DIR/dict/$t.dict"
    [ -f "$dict" ] || dict=""
    local regress="$ROOT/tests/fuzz/regressions/$t" # inputs that once failed, replayed first
    [ -d "$regress" ] || regress=""
    mkdir -p "$corpus" "$crashes"
    log="$FUZZ_DIR/logs/$t.$(date +%Y%m%d-%H%M%S).$$.log"
    mkdir -p "$FUZZ_DIR/logs"
    t0=$(date +%s.%N)
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
        "$FUZZ_DIR/bin/fuzz_$t" -max_total_time="$secs" -print_final_stats=1 -timeout=20 -rss_limit_mb=1024 \
        -artifact_prefix="$crashes/" ${dict:+-dict=$dict} ${FUZZ_RUNS:+-runs=$FUZZ_RUNS} "$@" \
        "$corpus" "$FUZZ_DIR/seeds/$t" $regress >"$log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$rc" != 0 ]; then
        log "fuzz $t: libFuzzer exited $rc; the end of $log:"
        grep -E 'ERROR|SUMMARY|Test unit written|==[0-9]+==|runtime error|fuzz:' "$log" | head -n 20 >&2 || true
    fi
    echo "${execs:-0} $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') $rc"
}

cmd_fuzz() {
    local only=${1:-} secs=${2:-60} t r execs el rc total_bad=0 json=""
    build_fuzz
    for t in $FUZZ_TARGETS; do
        [ -n "$only" ] && [ "$only" != all ] && [ "$only" != "$t" ] && continue
        r=$(fuzz_run "$t" "$secs" "$FUZZ_DIR/corpus/$t" | tail -n 1)
        read -r execs el rc <<<"$r"
        [ "$rc" = 0 ] || total_bad=$((total_bad + 1))
        printf 'fuzz %-12s %12s execs in %8.1f s (%6.0f/s), corpus %5s files, %s\n' "$t" "$execs" "$el" \
            "$(awk -v n="$execs" -v s="$el" 'BEGIN { printf "%.0f", n / (s + 0.001) }')" "$(ls "$FUZZ_DIR/corpus/$t" | wc -l)" \
            "$([ "$rc" = 0 ] && echo "0 crashes" || echo "FAILED (exit $rc, see build/fuzz/crashes/$t)")"
        json="$json${json:+, }\"$t\": {\"execs\": $execs, \"seconds\": $el, \"ok\": $([ "$rc" = 0 ] && echo true || echo false)}"
    done
    echo "{\"job\": \"fuzz\", \"cpu\": \"$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)\", \"targets\": {$json}}"
    [ "$total_bad" = 0 ]
}

# The test suite: each target ~FUZZ_SECONDS (20) on its seed corpus (a fresh scratch corpus,
# so the result does not depend on earlier campaigns); one case per target.
suite_fuzz_body() {
    local t r execs el rc pass=0 fail=0 tmp
    build_fuzz || { echo "FAIL fuzz build"; echo "SUITE: 0 passed, 1 failed"; return 1; }
    tmp=$(mktemp -d)
    for t in $FUZZ_TARGETS; do
        r=$(fuzz_run "$t" "${FUZZ_SECONDS:-20}" "$tmp/$t" | tail -n 1)
        read -r execs el rc <<<"$r"
        if [ "$rc" = 0 ]; then
            echo "ok   fuzz_$t"; pass=$((pass + 1))
        else
            echo "FAIL fuzz_$t"; fail=$((fail + 1))
        fi
        printf '     %s execs in %.1f s on the seeds, exit %s\n' "$execs" "$el" "$rc"
    done
    rm -rf "$tmp"
    echo "SUITE: $pass passed, $fail failed"
    [ "$fail" = 0 ]
}

suite_trainer_prog() { # suite_trainer_prog NAME ARGS...: tests/test_NAME.c drives the example trainers
    local name=$1; shift
    bash data/prepare.sh >&2
    if ! compile "$BUILD/train_tiny" examples/train_tiny.c || { [ "$name" != kill ] && ! compile "$BUILD/distill" examples/distill.c; } ||
        ! compile "$BUILD/test_$name" "tests/test_$name.c"; then
        log "suite $name does not compile: counted as one failed case"; FAILED=$((FAILED + 1)); return
    fi
    run_suite "$name" "$BUILD/test_$name" "$@"
}

UNIT_SUITES="numerics ops backend gradcheck determinism model fp8 distill infer badinput"
ALL_SUITES="$UNIT_SUITES plan dist compile cuda gpu sanitize trainer kill valgrind fuzz parity"

cmd_test() {
    local only=${1:-}
    local s suites=$ALL_SUITES
    [ -n "$only" ] && suites=$only
    for s in $suites; do
        case $s in
            compile) run_suite compile bash tests/compile_matrix.sh "$CC" ;;
            plan) run_suite plan bash tests/test_plan.sh "$CC" ;;
            dist) # needs Open MPI: without it (no network to install it) the suite is one failed case
                if need_pkg mpicc openmpi-bin libopenmpi-dev; then run_suite dist bash tests/test_dist.sh "$CC"
                else log "suite dist: Open MPI could not be installed: counted as one failed case"; FAILED=$((FAILED + 1)); fi ;;
            sanitize) suite_sanitize ;;
            cuda) suite_cuda ;;
            gpu) suite_gpu ;;
            parity) suite_parity ;;
            trainer|kill) suite_trainer_prog "$s" ;;
            valgrind) # a portable build (valgrind cannot decode AVX-512): train, save, resume, generate
                need_pkg valgrind valgrind; bash data/prepare.sh >&2; run_suite valgrind bash tests/valgrind.sh "$CC" ;;
            fuzz) run_suite fuzz suite_fuzz_body ;;
            *)
                if [ -f "tests/test_$s.c" ]; then suite_unit "$s"
                else log "unknown suite '$s' (have: $ALL_SUITES)"; FAILED=$((FAILED + 1)); fi ;;
        esac
    done
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
}

# ---- bench, examples ---------------------------------------------------------------------
cmd_bench() {
    local only=${1:-} f name libs
    [ $# -gt 0 ] && shift
    # OpenBLAS's own header: a netlib libblas-dev may own the cblas.h alternative, without openblas_*
    need_pkg /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h libopenblas-dev
    need_pkg gnuplot gnuplot-nox # bench/fp8 draws its loss curves with it
    bash data/prepare.sh >&2     # bench/fp8 trains on the corpus
    for f in bench/*.c; do
        name=$(basename "$f" .c)
        [ -n "$only" ] && [ "$only" != "$name" ] && continue
        libs=$LIBS
        case $name in gemm) libs="-I/usr/include/x86_64-linux-gnu/openblas-pthread $LIBS -lopenblas" ;; esac
        if [ "$name" = dist ]; then # under Open MPI: data parallel on 1, 2 and 4 ranks, then expert parallel
            need_pkg mpicc openmpi-bin libopenmpi-dev
            mpicc $BASE $OPT $OMP -DMOE_MPI "$f" -o "$BUILD/bench_$name" $libs
            for run in 1:1 2:1 4:1 2:2 4:4 4:2; do # np:ep
                np=${run%:*}; ep=${run#*:}
                OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
                    mpirun -np "$np" --oversubscribe --bind-to none "$BUILD/bench_$name" --ep "$ep" "$@"
            done
            continue
        fi
        $CC $BASE $OPT $OMP "$f" -o "$BUILD/bench_$name" $libs
        "$BUILD/bench_$name" "$@"
    done
}

# ./build.sh example NAME [--np P] [ARGS]: with --np, P ranks under Open MPI (NAME built with
# mpicc -DMOE_MPI as build/NAME_mpi; root allowed, more ranks than cores allowed, one OpenMP
# thread per rank unless OMP_NUM_THREADS says otherwise).
cmd_example() {
    local name=${1:?usage: ./build.sh example NAME [--np P] [args]} np=""; shift
    [ -f "examples/$name.c" ] || { log "no examples/$name.c"; exit 2; }
    if [ "${1:-}" = --np ]; then np=${2:?usage: ./build.sh example NAME --np P [ARGS]}; shift 2; fi
    bash data/prepare.sh >&2
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other work,
    # spinning threads steal the core a busy thread needs (measured: 2-thread steps up to 9x
    # slower under load). Set OMP_WAIT_POLICY=active for the last few percent on an idle box.
    if [ -z "$np" ]; then
        compile "$BUILD/$name" "examples/$name.c"
        OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} "$BUILD/$name" "$@"
        return
    fi
    need_pkg mpicc openmpi-bin libopenmpi-dev
    mpicc $BASE $OPT $OMP -DMOE_MPI "examples/$name.c" -o "$BUILD/${name}_mpi" $LIBS
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
        OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} mpirun -np "$np" --oversubscribe --bind-to none "$BUILD/${name}_mpi" "$@"
}

# ./build.sh run [--np P] [ARGS]: the main job, examples/train_tiny (with --np, P ranks).
cmd_run() { cmd_example train_tiny "$@"; }

case ${1:-build} in
    build) bash data/prepare.sh >&2; build_all ;;
    test) shift; cmd_test "${1:-}" ;;
    bench) shift; cmd_bench "$@" ;;
    example) shift; cmd_example "$@" ;;
    run) shift; cmd_run "$@" ;;
    cuda) cmd_cuda ;;
    torture) # 20 kills of a 200-step run, niced: the machine is shared
        shift; bash data/prepare.sh >&2
        compile "$BUILD/train_tiny" examples/train_tiny.c && compile "$BUILD/test_kill" tests/test_kill.c
        nice -n 19 "$BUILD/test_kill" --kills 20 --steps 200 --json "$@" ;;
    fuzz) shift; cmd_fuzz "$@" ;;
    -h|--help|help) sed -n '2,19p' "$0" ;;
    *) log "unknown command '$1' (try ./build.sh help)"; exit 2 ;;
esac

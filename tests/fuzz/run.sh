#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan + UBSan) in build-fuzz and runs each for a bounded
# time: first over every input that once failed (regressions/<harness>/, a plain replay), then
# fuzzing from the committed seeds (corpus/<harness>/; new inputs go to a scratch copy). Any
# crash, sanitizer report, leak or timeout fails the run and leaves its input in
# build-fuzz/findings/<harness>/ (add it to regressions/ with the fix).
#
#   tests/fuzz/run.sh [SECONDS_EACH (default 60)] [HARNESS ...]
#
# Environment: UC_SHARED_DIR (fixtures, default ../shared), JOBS.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-60}
shift || true
SHARED=${UC_SHARED_DIR:-$(cd .. && pwd)/shared}
JOBS=${JOBS:-$(nproc)}
ALL="fuzz_safetensors fuzz_st_index fuzz_model_config fuzz_tokenizer_json fuzz_tokenize
     fuzz_daemon_config fuzz_grpc_request"
WANT=${*:-$ALL}

echo "== fuzz: build (clang, ASan + UBSan, libFuzzer)"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DUC_FUZZ=ON -DUC_SANITIZE_ADDRESS=ON -DUC_SANITIZE_UNDEFINED=ON -DUC_BUILD_TESTS=OFF \
    -DUC_SHARED_DIR="$SHARED" >/dev/null
cmake --build build-fuzz -j "$JOBS" --target fuzz_all

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1:allocator_may_return_null=1:intercept_tls_get_addr=0  # see tests/run.sh
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
export UC_FUZZ_MODEL="$SHARED/models/uncomp-tiny"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
fails=0
for h in $WANT; do
    bin=build-fuzz/tests/fuzz/$h
    findings=build-fuzz/findings/$h
    scratch=build-fuzz/corpus/$h
    rm -rf "$findings" "$scratch"
    mkdir -p "$findings" "$scratch"
    cp tests/fuzz/corpus/$h/* "$scratch"/ 2>/dev/null || true
    log=build-fuzz/findings/$h.log
    if [ -d tests/fuzz/regressions/$h ] && [ -n "$(ls -A tests/fuzz/regressions/$h)" ]; then
        if ! "$bin" -runs=0 tests/fuzz/regressions/$h/* >"$log" 2>&1; then
            echo "FAIL $h: a regression input fails again"; tail -40 "$log"; fails=$((fails + 1))
            continue
        fi
    fi
    if "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2560 -max_len=16384 \
        -print_final_stats=1 -artifact_prefix="$findings/" "$scratch" >"$log" 2>&1; then
        echo "ok   $h: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" |
                          grep -o '[0-9]*$') runs in ${SECS}s, corpus $(ls "$scratch" | wc -l)"
    else
        echo "FAIL $h: finding in $findings"
        grep -a -A30 -m1 "ERROR\|runtime error" "$log" || tail -40 "$log"
        fails=$((fails + 1))
    fi
done
[ "$fails" -eq 0 ]

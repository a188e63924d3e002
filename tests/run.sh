#!/usr/bin/env bash
# The test command of README.md (and .ci/run): installs the dependencies, builds with warnings as
# errors, runs every test but the benchmarks (tests that need a GPU skip), then builds with
# AddressSanitizer + UBSan and runs the unit, fault, golden and end-to-end tests again, then runs
# every libFuzzer harness of tests/fuzz for FUZZ_SECONDS (default 60) each.
# The fixtures folder defaults to ../shared beside the checkout (UC_SHARED_DIR overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
SHARED=${UC_SHARED_DIR:-$(cd .. && pwd)/shared}
if [ ! -d "$SHARED/models" ]; then
    echo "tests/run.sh: fixtures not found at $SHARED (set UC_SHARED_DIR)" >&2
    exit 1
fi
JOBS=${JOBS:-$(nproc)}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "== build (warnings as errors)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUC_WERROR=ON \
    -DUC_SHARED_DIR="$SHARED"
cmake --build build -j "$JOBS"
echo "== tests"
ctest --test-dir build --output-on-failure --label-exclude bench

echo "== build (AddressSanitizer + UBSan)"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DUC_WERROR=ON \
    -DUC_SANITIZE_ADDRESS=ON -DUC_SANITIZE_UNDEFINED=ON -DUC_SHARED_DIR="$SHARED"
cmake --build build-asan -j "$JOBS"
echo "== tests under ASan + UBSan"
# intercept_tls_get_addr=0: GCC 12's runtime can take a malloc'd dynamic TLS block at offset 16
# of a page for a pre-2.25 glibc header and read a bogus range from it; LeakSanitizer's tracer
# then dies with SIGSEGV at exit (seen as 'Tracer caught signal 11', DTLS at 0x3bdc-0x400004cde)
export ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0:abort_on_error=0:intercept_tls_get_addr=0
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build-asan --output-on-failure --label-regex "unit|fault|golden|e2e"

echo "== fuzzers (clang, ASan + UBSan): ${FUZZ_SECONDS:-60} s each"
UC_SHARED_DIR="$SHARED" tests/fuzz/run.sh "${FUZZ_SECONDS:-60}"

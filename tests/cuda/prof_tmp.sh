lib=$(dirname $(find /usr/local/cuda* -name "libcupti.so*" 2>/dev/null | head -1))
gcc -O2 -shared -fPIC -I/usr/local/cuda/include tests/cuda/cupti_trace.c -L$lib -lcupti -o /tmp/cupti_trace.so || exit 1
bash tests/cuda/device_check.sh /tmp/bd "$@" 2>&1 | grep -v " ok$"
export LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu:$PWD/.deps/root/usr/lib/x86_64-linux-gnu/openblas-openmp:$lib
for pdl in 1; do
UC_CUDA_PDL=$pdl UC_TRACE_OUT=/tmp/t$pdl.csv LD_PRELOAD=/tmp/cupti_trace.so /tmp/bd/tests/bench/bench_gpu --skip-compress --prefill 512 --reps 1 --decode-steps 16 2>&1 | grep decode
echo "== traced, PDL=$pdl"; python3 tests/cuda/trace_steps.py /tmp/t$pdl.csv 8
done

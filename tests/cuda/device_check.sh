#!/usr/bin/env bash
# The CUDA checks on a GPU host (the device machine), in one call: unpacks the .deb files carried
# in .deps (tests/cuda/fetch_deps.sh fills it here) into .deps/root (never into /), configures
# the whole tree against them (engine, uncompd + uncompctl with gRPC, tests), builds every
# target, then runs the named steps, each with its rc and wall time. Fixtures come from
# .fixtures (models/stories260K, models/uncomp-tiny with golden.json), since ../shared does not
# travel. Steps: ops (with --bench), decbench and specbench (decode attention or query spectra
# timings alone; DECBENCH_SHAPES=B:CTX[:RATIO],... picks decbench's shapes, a RATIO timing
# the engine's ranges with uncomp-like uneven heads, half of them RATIO times the others),
# prodbench (a layer's four products at decode batches of 1-64 rows, weights from memory),
# prodsearch (those products at 32 rows against every cuBLASLt configuration, and a decode
# layer's chain with L2 prefetches, tests/cuda/bench_decode_products.cu; PRODSEARCH_ARGS
# replaces its arguments), kvfree (tests/bench/bench_kv_free: ending b's 32 sequences' KV caches
# at 1-16 OpenMP threads; KVFREE_ARGS replaces its arguments), ncu-decode (Nsight Compute
# on one decode attention launch; NCU_ARGS replaces its sections), ncu-prefill (the same for
# the Hopper prefill attention and PyTorch's default SDPA kernel, PREFILL_N tokens), ctest
# (label cuda), golden, golden-fp32, kvmem (KV memory accounting and copy-on-write forks on the
# device, tests/golden/test_kv_memory.c), lookahead (the decode lookahead's logits with and
# without it, tests/golden/test_decode_lookahead.c), overlap (the decode step in flight's greedy
# tokens with and without it, tests/golden/test_decode_overlap.c),
# kvsharer, kvsharer-tp2 (KVSharer on the device in fp32 against the numpy reference: shared
# layers' decode through rope_append's skipped slots; needs python3 with numpy, else exit 77),
# think (ThinK's packed heads on the device: pool blocks, forks, eviction,
# tests/golden/test_think.c), think-ref (its kept channels and logits in float32 against
# tests/golden/think_reference.py; exit 77 without numpy),
# minicache (MiniCache's merged rows on the device: pool blocks, forks, mixed batches,
# tests/golden/test_minicache.c), minicache-ref (merged sets and logits in float32 against
# tests/golden/minicache_ref.py; exit 77 without numpy), minicache-calib (the calibrated merge
# set's distances, pairs and decode in float32 against tests/golden/minicache_calib_ref.py on
# uncomp-tiny), minicache-tp2,
# lorc (LoRC's latent heads on the device: pool blocks, admission, forks, mixed batches,
# tests/golden/test_lorc.c), lorc-ref (its ranks and logits in float32 against
# tests/golden/lorc_ref.py; exit 77 without numpy),
# tp2, tp2-fp32, tp2-compress (compression plans, kept sets and mixed-equals-alone at tp 2, fp32),
# tp2-plane-mismatch (ranks started with different UC_CUDA_DATA_PLANE values all fail, saying so),
# bench, bench4k, bench8k-l15 (15 layers: 8192 tokens fit the bench's KV pool),
# prefbench (prefill attention, both D = 128 kernels, beside the GEMM ceiling; then in the
# engine's conditions: medians by the spread of Q/K/V, and each call right after a product),
# gpu, gpu-quick, torch, torch-attn (PyTorch's SDPA backends in prefbench's context cases),
# trace (decode kernels and gaps, tests/cuda/cupti_trace.c; TRACE_ARGS
# replaces its bench_gpu arguments; TRACE_WINDOW_MS=N summarises the last N ms instead, with
# tests/cuda/trace_window.py),
# e2e (both end-to-end suites against --backend cuda; e2e-grpc, e2e-ctl one each),
# methods (bench_gpu --methods: each KV method's bytes per sequence, the batch a 16 GiB pool
# holds, aggregate decode tokens/s there; METHODS_ARGS replaces the --methods list),
# serve (tests/bench/serve_gpu.sh; serve:a,b picks workloads, SERVE_ARGS adds options).
# A step written VAR=VALUE:STEP (or A=1:B=2:STEP) runs with those variables set (e.g.
# UC_CUDA_PDL=0:gpu-quick; UC_CUDA_DATA_PLANE=mpi:tp2 runs tp 2 with both ranks on one GPU,
# over the host-staged plane).
# GPU_MONITOR=1 (in the environment) samples the SM clock, power, temperature and the driver's
# limits (power cap, heat) with nvidia-smi during each step and prints their summary after it
# (tests/bench/gpu_monitor.py): whether a long step ran at the clocks a short one did.
# UC_DEPS_ROOT moves the unpacked tree (a dry run on a build machine: keep it out of .deps).
# NEED_GPU=NAME (e.g. H200) runs nothing, exit 3, on a GPU whose name lacks NAME: a target
# measured on one card is not spent on another (a call that lands elsewhere costs its start).
# Usage: tests/cuda/device_check.sh BUILD_DIR STEP...
set -u -o pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bd=${1:?usage: device_check.sh BUILD_DIR STEP...}
shift
if [ -n "${NEED_GPU:-}" ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  case "$gpu" in
    *"$NEED_GPU"*) ;;
    *) echo "device_check: NEED_GPU=$NEED_GPU, this is '${gpu:-no GPU}': nothing run"; exit 3 ;;
  esac
fi
deps=${UC_DEPS_ROOT:-$root/.deps/root}
lib=$deps/usr/lib/x86_64-linux-gnu
if [ ! -d "$deps/usr" ]; then
  for f in "$root"/.deps/*.deb; do dpkg -x "$f" "$deps" || exit 1; done
fi
# The .pc files name /usr, which PKG_CONFIG_SYSROOT_DIR maps into the unpacked tree. grpc.pc and
# gpr.pc require abseil's .pc files (not carried; the C core headers need no abseil headers),
# and grpc.pc names its libdir as /usr/lib and links re2, upb, c-ares and zlib, whose unversioned
# .so links only the -dev packages we do not carry have (libgrpc.so finds its own through
# LD_LIBRARY_PATH): keep -lgrpc alone. libmicrohttpd.pc requires gnutls privately (not needed for
# shared linking). Idempotent.
pc=$lib/pkgconfig
if [ -f "$pc/grpc.pc" ]; then
  sed -i -e '/^Requires:/d' -e 's|^libdir=.*|libdir=${prefix}/lib/x86_64-linux-gnu|' \
    -e 's|^Libs:.*|Libs: -L${libdir} -lgrpc|' "$pc/grpc.pc"
  sed -i -e '/^Requires:/d' -e 's|^libdir=.*|libdir=${prefix}/lib/x86_64-linux-gnu|' "$pc/gpr.pc"
  sed -i -e '/^Requires.private:/d' "$pc/libmicrohttpd.pc"
fi
# protoc-c (build), protoc + grpc_python_plugin (the Python suite's stubs), pkgconf; the
# host's python3 stays first (the tree has python3.11 only)
export PATH=$deps/usr/bin:$PATH
export PKG_CONFIG_LIBDIR=$pc:$deps/usr/share/pkgconfig PKG_CONFIG_SYSROOT_DIR=$deps
export LD_LIBRARY_PATH=$lib:$lib/openblas-openmp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
fx=$root/.fixtures
if [ ! -f "$bd/build.ninja" ]; then
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  # CMAKE_LIBRARY_PATH: find_library (and pkg_check_modules resolving -l names) looks in the
  # unpacked tree before the system folders, also on a build machine that has the packages
  cmake -S "$root" -B "$bd" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUC_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$nvcc" -DUC_BUILD_DAEMON=ON \
    -DUC_DEPS_PREFIX="$deps/usr" -DCMAKE_LIBRARY_PATH="$lib" -DCMOCKA_LIB="$lib/libcmocka.so" \
    -DPKG_CONFIG_EXECUTABLE="$deps/usr/bin/pkgconf" -DPROTOC_C="$deps/usr/bin/protoc-c" \
    -DUC_SHARED_DIR="$fx" > "$bd.cmake.log" 2>&1 || { tail -40 "$bd.cmake.log"; exit 1; }
  grep -E "deps prefix|CUDA backend|gRPC daemon" "$bd.cmake.log"
fi
t0=$(date +%s)
# every target; if that fails, the engine targets alone, so the engine steps can still run
if ninja -C "$bd" ${UC_NINJA_JOBS:+-j$UC_NINJA_JOBS} > "$bd.build.log" 2>&1; then
  echo "=== build ok in $(( $(date +%s) - t0 )) s; warnings: $(grep -c 'warning' "$bd.build.log")"
else
  grep -E "error|FAILED" -A3 "$bd.build.log" | head -60
  echo "=== full build FAILED; building the engine targets only"
  ninja -C "$bd" ${UC_NINJA_JOBS:+-j$UC_NINJA_JOBS} test_cuda_ops golden_model golden_compress \
    golden_entropy golden_kv_memory bench_engine bench_gpu eval_compress > "$bd.build2.log" 2>&1 ||
    { grep -E "error|FAILED" -A3 "$bd.build2.log" | head -60; exit 1; }
fi
mpi="mpirun --allow-run-as-root --oversubscribe -np 2 -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH"

# The end-to-end suites (tests/e2e) against --backend $E2E_BACKEND (cuda; cpu for a dry run on a
# build machine). The Python suite needs grpcio and protobuf: Debian's python3.11 with them,
# unpacked from .deps (the versions the suite is written against; the host's python3 is 3.12
# and cannot import Debian's 3.11 extension), else the host's python3 if it imports both; its
# stubs come from the carried protoc + grpc_python_plugin (PATH). The uncompctl suite needs only
# the standard library. Two ranks cannot share one GPU under NCCL: with fewer than two GPUs the
# tp 2 cases are skipped (--no-mpi), unless UC_CUDA_DATA_PLANE=mpi (the host-staged data plane,
# shard/comm_staged.c) runs both ranks on the one GPU.
e2e_common() {
  export UC_E2E_DAEMON_ARGS="--backend ${E2E_BACKEND:-cuda} ${E2E_EXTRA:-}" PYTHONUNBUFFERED=1
  # the daemon's bundled model (and its calibration text) whatever the build folder is
  export OMPI_MCA_rmaps_base_oversubscribe=1 UNCOMP_MODEL=$root/models/uncomp-tiny
  e2e_flags=()
  local ngpu
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  if [ "${E2E_BACKEND:-cuda}" = cuda ] && [ "$ngpu" -lt 2 ]; then
    if [ "${UC_CUDA_DATA_PLANE:-}" = mpi ]; then
      echo "($ngpu GPU: tp 2 cases with both ranks on it, host-staged MPI data plane)"
    else
      echo "($ngpu GPU: tp 2 cases skipped, --no-mpi)"
      e2e_flags=(--no-mpi)
    fi
  fi
}
e2e_grpc() {
  e2e_common
  local py=()
  if [ -x "$deps/usr/bin/python3.11" ] && PYTHONHOME=$deps/usr PYTHONNOUSERSITE=1 \
       "$deps/usr/bin/python3.11" -c 'import grpc, google.protobuf' 2> /dev/null; then
    py=(env PYTHONHOME="$deps/usr" PYTHONNOUSERSITE=1 "$deps/usr/bin/python3.11")
  elif python3 -c 'import grpc, google.protobuf' 2> /dev/null; then
    py=(python3)
  else
    echo "no Python with grpcio and protobuf (carried python3.11 or the host's): e2e-grpc not run"
    return 1
  fi
  echo "(e2e-grpc with ${py[*]: -1}: $("${py[@]}" -c 'import sys, grpc, google.protobuf as p
print(sys.version.split()[0], "grpcio", grpc.__version__, "protobuf", p.__version__)'))"
  timeout 420 "${py[@]}" "$root/tests/e2e/test_e2e.py" --daemon "$bd/daemon/uncompd" \
    --model "$fx/models/uncomp-tiny" --mpirun "$(command -v mpirun)" "${e2e_flags[@]}"
}
e2e_ctl() {
  e2e_common
  timeout 300 python3 "$root/tests/e2e/test_uncompctl.py" --uncompctl "$bd/client/uncompctl" \
    --daemon "$bd/daemon/uncompd" --mpirun "$(command -v mpirun)" "${e2e_flags[@]}"
}
rc=0
for step in "$@"; do
  echo "=== step $step"
  t0=$(date +%s.%N)
  mon=
  if [ -n "${GPU_MONITOR:-}" ]; then
    rm -f "$bd.gpumon"
    python3 "$root/tests/bench/gpu_monitor.py" --record "$bd.gpumon" &
    mon=$!
  fi
  # a step named VAR=VALUE:STEP (or A=1:B=2:STEP) runs STEP with those variables set
  envset=()
  while [[ $step =~ ^[A-Za-z_][A-Za-z0-9_]*=[^:]*: ]]; do
    envset+=("${step%%:*}")
    step=${step#*:}
  done
  (
  [ ${#envset[@]} -gt 0 ] && export "${envset[@]}"
  # ranks sharing one GPU need the host-staged data plane on every rank
  [ -n "${UC_CUDA_DATA_PLANE:-}" ] && mpi="$mpi -x UC_CUDA_DATA_PLANE"
  case $step in
    ops) timeout 300 "$bd/tests/cuda/test_cuda_ops" --bench ;;
    decbench) timeout 120 "$bd/tests/cuda/test_cuda_ops" --bench-decode ${DECBENCH_SHAPES:-} ;;
    ncu-decode) # Nsight Compute on one decode attention launch (DECBENCH_SHAPES, default 32:8192)
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout 300 "$ncu" ${NCU_ARGS:---section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section SchedulerStats \
        --section LaunchStats -k regex:decode_tc --launch-skip 1 --launch-count 1} \
        "$bd/tests/cuda/test_cuda_ops" --bench-decode "${DECBENCH_SHAPES:-32:8192}" ;;
    ncu-prefill) # Nsight Compute on one prefill attention launch (std 1, alone) at PREFILL_N
      # (default 8192), then on PyTorch's default SDPA kernel in the same case
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      sec=${NCU_ARGS:---section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section InstructionStats \
        --section SchedulerStats --section Occupancy --section LaunchStats}
      timeout 200 "$ncu" $sec -k regex:f3_kernel --launch-skip 1 --launch-count 1 \
        "$bd/tests/cuda/test_cuda_ops" --bench-prefill "${PREFILL_N:-8192}" &&
      timeout 200 "$ncu" $sec --nvtx --nvtx-include "torch_attn/" --launch-skip 1 \
        --launch-count 2 python3 "$root/tests/bench/torch_attn.py" \
        --tokens "${PREFILL_N:-8192}" --std 1.0 ;;
    specbench) timeout 120 "$bd/tests/cuda/test_cuda_ops" --bench-qspec ;;
    prodbench) timeout 120 "$bd/tests/cuda/test_cuda_ops" --bench-products ;;
    prodsearch) timeout 500 "$bd/tests/cuda/bench_decode_products" ${PRODSEARCH_ARGS:-} ;;
    kvfree) timeout 120 "$bd/tests/bench/bench_kv_free" ${KVFREE_ARGS:---seqs 32 --threads 1,2,4,8,16} ;;
    prefbench) timeout 120 "$bd/tests/cuda/test_cuda_ops" --bench-prefill ;;
    ctest) timeout 300 ctest --test-dir "$bd" -L cuda --output-on-failure ;;
    golden) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_model" "$fx" ;;
    golden-fp32) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 "$bd/tests/golden/golden_model" "$fx" ;;
    kvmem) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_kv_memory" "$fx" ;;
    lookahead) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_decode_lookahead" "$fx" ;;
    overlap) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_decode_overlap" "$fx" ;;
    # the device's /usr/bin/python3 has no numpy; the python3 on its PATH has
    kvsharer) UC_PYTHON=$(command -v python3) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 \
                "$bd/tests/golden/golden_kvsharer" "$fx" ;;
    kvsharer-tp2) UC_PYTHON=$(command -v python3) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 \
                    $mpi -x UC_PYTHON -x UC_TEST_BACKEND -x UC_TEST_FP32 \
                    "$bd/tests/golden/golden_kvsharer" "$fx" ;;
    think) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_think" "$fx" ;;
    think-ref) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 python3 \
                 "$root/tests/golden/think_reference.py" "$bd/tests/golden/golden_think" "$fx" ;;
    minicache) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_minicache" "$fx" ;;
    minicache-ref) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 python3 \
                     "$root/tests/golden/minicache_ref.py" "$bd/tests/golden/golden_minicache" "$fx" ;;
    minicache-calib) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 UC_TEST_ONLY_MODEL=uncomp-tiny \
                       UC_PYTHON=$(command -v python3) timeout 200 \
                       "$bd/tests/golden/golden_minicache_calib" "$fx" ;;
    minicache-tp2) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 $mpi -x UC_TEST_BACKEND \
                     -x UC_TEST_FP32 "$bd/tests/golden/golden_minicache" "$fx" ;;
    lorc) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_lorc" "$fx" ;;
    lorc-ref) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 python3 \
                "$root/tests/golden/lorc_ref.py" "$bd/tests/golden/golden_lorc" "$fx" ;;
    tp2) UC_TEST_BACKEND=cuda timeout 200 $mpi -x UC_TEST_BACKEND "$bd/tests/golden/golden_model" "$fx" ;;
    tp2-fp32) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 $mpi -x UC_TEST_BACKEND -x UC_TEST_FP32 \
                "$bd/tests/golden/golden_model" "$fx" ;;
    tp2-compress) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 $mpi -x UC_TEST_BACKEND \
                    -x UC_TEST_FP32 "$bd/tests/golden/golden_compress" "$fx" ;;
    tp2-plane-mismatch) # ranks that chose different data planes all fail, with the reason
      out=$(UC_TEST_BACKEND=cuda timeout 120 ${mpi/-np 2/-np 1} -x UC_TEST_BACKEND \
              env UC_CUDA_DATA_PLANE=mpi "$bd/tests/golden/golden_model" "$fx" : \
              -np 1 env UC_CUDA_DATA_PLANE=nccl "$bd/tests/golden/golden_model" "$fx" 2>&1)
      r=$?
      echo "$out" | grep -m2 "UC_CUDA_DATA_PLANE"
      [ $r -ne 0 ] && [ $r -ne 124 ] && echo "$out" | grep -q "different UC_CUDA_DATA_PLANE" ;;
    tp4) UC_TEST_BACKEND=cuda timeout 200 ${mpi/-np 2/-np 4} -x UC_TEST_BACKEND \
           "$bd/tests/golden/golden_model" "$fx" ;;
    tp4-fp32) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 ${mpi/-np 2/-np 4} -x UC_TEST_BACKEND \
                -x UC_TEST_FP32 "$bd/tests/golden/golden_model" "$fx" ;;
    tp4-compress) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 ${mpi/-np 2/-np 4} \
                    -x UC_TEST_BACKEND -x UC_TEST_FP32 "$bd/tests/golden/golden_compress" "$fx" ;;
    bench) timeout 240 "$bd/tests/bench/bench_engine" --backend cuda --model synthetic:llama3-8b \
             --lengths 512,8192 --reps 3 --decode 32 ;;
    bench8k-l15) timeout 240 "$bd/tests/bench/bench_engine" --backend cuda \
                   --model synthetic:llama3-8b:layers=15 --lengths 512,8192 --reps 3 --decode 32 ;;
    bench4k) timeout 240 "$bd/tests/bench/bench_engine" --backend cuda --model synthetic:llama3-8b \
               --lengths 512,4000 --reps 3 --decode 32 ;;
    compress-fp32) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 \
                     "$bd/tests/golden/golden_compress" "$fx" ;;
    entropy) UC_TEST_BACKEND=cuda timeout 200 "$bd/tests/golden/golden_entropy" "$fx" ;;
    gpu) timeout 420 "$bd/tests/bench/bench_gpu" --reps 3 ;;
    stage-study) timeout 500 bash "$root/tests/bench/stage_study.sh" \
                   "$bd/tests/bench/eval_compress" "$fx" --backend cuda --fp32 1 ;;
    entropy-fp32) UC_TEST_BACKEND=cuda UC_TEST_FP32=1 timeout 200 \
                    "$bd/tests/golden/golden_entropy" "$fx" ;;
    eval-table) timeout 500 "$bd/tests/bench/eval_compress" --shared "$fx" --backend cuda \
                  --fp32 1 --lengths 2048,4000 --trials 4 --budgets 64,128,256,512 \
                  --ppl-segments 2 --ppl-prefix 1536 --ppl-tokens 256 \
                  --csv "${OUT:-/tmp}/eval.csv" ;;
    stage-final)
      for cfg in "" "--stage-starts 4,6 --r-min 0.5"; do
        echo "== uncomp-stage defaults (profile boundaries, accum-max) ${cfg}"
        timeout 200 "$bd/tests/bench/eval_compress" --shared "$fx" --backend cuda --fp32 1 \
          --lengths 2048,3072,4000 --trials 8 --budgets 128,256 --ppl-segments 0 \
          --policies full,uncomp,uncomp-stage $cfg | grep -v '^#'
      done ;;
    trace) # kernel-by-kernel breakdown of decode steps (CUPTI; the device has no nsys)
      cupti=$(dirname "$(find /usr/local/cuda*/ -name 'libcupti.so*' 2>/dev/null | head -1)")
      gcc -O2 -shared -fPIC -I/usr/local/cuda/include "$root/tests/cuda/cupti_trace.c" \
        -L"$cupti" -lcupti -o "$bd/cupti_trace.so" &&
      LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$cupti UC_TRACE_OUT=$bd/trace.csv \
        LD_PRELOAD=$bd/cupti_trace.so timeout 200 "$bd/tests/bench/bench_gpu" --skip-compress \
        ${TRACE_ARGS:---prefill 512 --reps 1 --decode-steps 16} | grep decode &&
      if [ -n "${TRACE_WINDOW_MS:-}" ]; then
        python3 "$root/tests/cuda/trace_window.py" "$bd/trace.csv" "$TRACE_WINDOW_MS"
      else
        python3 "$root/tests/cuda/trace_steps.py" "$bd/trace.csv" 8
      fi ;;
    methods) # the KV methods' decode at the batch their savings buy (bench_gpu section 6)
      timeout 300 "$bd/tests/bench/bench_gpu" --reps 3 --prefill 512 --ctx 8192 \
        --budget-frac 0.1 --kv-mem-gib 16 --max-batch 256 --skip-compress \
        ${METHODS_ARGS:---methods full,think,minicache,lorc,snapkv,snapkv+think,snapkv+minicache,snapkv+lorc,uncomp,uncomp+think,uncomp+lorc} ;;
    gpu-quick) timeout 200 "$bd/tests/bench/bench_gpu" --reps 3 --skip-compress --prefill 8192 ;;
    gpu-args) timeout 300 "$bd/tests/bench/bench_gpu" ${GPU_ARGS:---reps 3} ;; # bench_gpu, any options
    torch) timeout 300 python3 "$root/tests/bench/torch_compare.py" --reps 3 ;;
    torch-attn) timeout 200 python3 "$root/tests/bench/torch_attn.py" ;;
    e2e-grpc) e2e_grpc ;;
    e2e-ctl) e2e_ctl ;;
    e2e) e2e_grpc; r1=$?; e2e_ctl; r2=$?; [ $r1 -eq 0 ] && [ $r2 -eq 0 ] ;;
    serve|serve:*) # the serving benchmark; serve:a,c picks workloads, SERVE_ARGS adds options.
      # It gets what is left of SERVE_BUDGET_S (570 s, inside the device's 600 s a call) since
      # this script started, and ends in time (fewer requests, not nothing).
      w=all
      [[ $step == serve:* ]] && w=${step#serve:}
      left=$(( ${SERVE_BUDGET_S:-570} - SECONDS ))
      timeout $(( left > 30 ? left + 20 : 50 )) python3 "$root/tests/bench/serve_gpu.py" \
        --build "$bd" --workloads "$w" --budget-s $(( left > 30 ? left : 30 )) ${SERVE_ARGS:-} ;;
    *) echo "unknown step $step"; false ;;
  esac
  )
  r=$?
  if [ -n "$mon" ]; then
    kill "$mon" 2> /dev/null; wait "$mon" 2> /dev/null
    python3 "$root/tests/bench/gpu_monitor.py" "$bd.gpumon"
  fi
  echo "=== step $step rc=$r wall=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
  [ $r -ne 0 ] && rc=$r
done
exit $rc

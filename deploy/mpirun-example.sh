#!/usr/bin/env bash
# Launches uncompd with tensor parallelism under Open MPI, on one host or several, and waits
# until it serves. Examples:
#
#   deploy/mpirun-example.sh local 2                  # 2 ranks on this host (CPU), loopback
#   deploy/mpirun-example.sh local 4 --backend cuda   # 4 GPUs of this host
#   deploy/mpirun-example.sh hosts 4 --backend cuda   # 4 ranks over deploy/hostfile.example
#
# Extra arguments go to uncompd. Environment: UNCOMPD, UNCOMPCTL (binaries), UNCOMP_CONFIG
# (config file, default deploy/uncompd.conf), UNCOMP_MODEL (model folder; default the bundled
# one), UNCOMP_LISTEN (default 127.0.0.1:50051 locally, 0.0.0.0:50051 across hosts), HOSTFILE,
# NET_IF (the network interface MPI and NCCL use between hosts, e.g. eth0 or ib0).
# uncompd refuses to listen beyond loopback without TLS and an API key: across hosts pass
# --tls-cert, --tls-key and --api-key-file (deploy/README.md, "TLS and API keys").
#
# Stop it with Ctrl-C or `uncompctl --server ADDR drain`: rank 0 drains (no new requests, the
# running ones finish up to --drain-timeout), then every rank exits 0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
UNCOMPD="${UNCOMPD:-$REPO/build/daemon/uncompd}"
UNCOMPCTL="${UNCOMPCTL:-$REPO/build/client/uncompctl}"
CONFIG="${UNCOMP_CONFIG:-$HERE/uncompd.conf}"
HOSTFILE="${HOSTFILE:-$HERE/hostfile.example}"

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

[ $# -ge 2 ] || usage
MODE="$1"
NP="$2"
shift 2
case "$NP" in '' | *[!0-9]*) usage ;; esac

MPIRUN=(mpirun -np "$NP")
if [ "$(id -u)" -eq 0 ]; then
    MPIRUN+=(--allow-run-as-root)
fi
# CPU ranks use OpenMP threads of their own: do not pin each rank to one core
MPIRUN+=(--bind-to none)
# NVLink multicast (NVLS) stays off; pass the NCCL/OpenMP settings on to every rank
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
for v in NCCL_NVLS_ENABLE OMP_NUM_THREADS CUDA_VISIBLE_DEVICES NCCL_DEBUG; do
    [ -n "${!v:-}" ] && MPIRUN+=(-x "$v")
done

case "$MODE" in
local)
    LISTEN="${UNCOMP_LISTEN:-127.0.0.1:50051}"
    # more ranks than cores (a laptop, CI) is fine for CPU testing
    MPIRUN+=(--oversubscribe)
    ;;
hosts)
    LISTEN="${UNCOMP_LISTEN:-0.0.0.0:50051}"
    [ -r "$HOSTFILE" ] || { echo "no hostfile at $HOSTFILE" >&2; exit 2; }
    # ranks fill the first host's slots, then the next host's: rank 0 is on the first host
    MPIRUN+=(--hostfile "$HOSTFILE")
    if [ -n "${NET_IF:-}" ]; then
        export NCCL_SOCKET_IFNAME="$NET_IF"
        MPIRUN+=(--mca btl_tcp_if_include "$NET_IF" --mca oob_tcp_if_include "$NET_IF"
                 -x NCCL_SOCKET_IFNAME)
    fi
    ;;
*)
    usage
    ;;
esac

ARGS=(--tp "$NP" --listen "$LISTEN")
[ -r "$CONFIG" ] && ARGS=(--config "$CONFIG" "${ARGS[@]}")
[ -n "${UNCOMP_MODEL:-}" ] && ARGS+=(--model "$UNCOMP_MODEL")

echo "+ ${MPIRUN[*]} $UNCOMPD ${ARGS[*]} $*" >&2
"${MPIRUN[@]}" "$UNCOMPD" "${ARGS[@]}" "$@" &
JOB=$!
trap 'kill -TERM "$JOB" 2>/dev/null; wait "$JOB"' INT TERM

# wait until rank 0 reports SERVING (model loaded on every rank and a warm-up step done)
CLIENT_ADDR="${LISTEN/0.0.0.0/127.0.0.1}"
if [ -x "$UNCOMPCTL" ]; then
    if "$UNCOMPCTL" --server "$CLIENT_ADDR" --wait --connect-timeout-ms 600000 \
        health --wait-ms 600000 >/dev/null; then
        echo "uncompd serving on $LISTEN (tp $NP); try: $UNCOMPCTL --server $CLIENT_ADDR info" >&2
    else
        echo "uncompd did not become SERVING; see its log above" >&2
    fi
fi
wait "$JOB"

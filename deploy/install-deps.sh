#!/usr/bin/env bash
# Installs every Debian 12 package uncomp needs to build, test and run (idempotent).
# Usage: deploy/install-deps.sh          (as root, or with sudo available)
set -euo pipefail

PKGS=(
    build-essential cmake ninja-build pkg-config git
    libopenmpi-dev openmpi-bin
    iproute2                    # ip netns, veth pairs: tests/mpi/test_tp_netns.sh
    libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev
    libgrpc-dev protobuf-compiler-grpc
    libcmocka-dev
    libopenblas-openmp-dev
    libpcre2-dev libutf8proc-dev libcjson-dev libmicrohttpd-dev libsystemd-dev
    python3 python3-grpcio python3-protobuf python3-numpy
    clang libclang-rt-14-dev   # tests/fuzz: libFuzzer, ASan + UBSan
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: all ${#PKGS[@]} packages present"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"

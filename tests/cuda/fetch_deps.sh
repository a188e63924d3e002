#!/usr/bin/env bash
# Run HERE (Debian 12, apt reachable), before a device call: fills the two git-ignored folders
# that tests/cuda/device_check.sh reads on the GPU host, which has none of these packages and
# cannot download anything.
#   .deps/      Debian 12 .deb files for building and running the whole tree there (engine,
#               uncompd + uncompctl with gRPC, the tests) and for the Python gRPC suite
#               (Debian's python3.11 with python3-grpcio / python3-protobuf, the versions the
#               suite is written against; the host's own python3 is 3.12). device_check.sh
#               unpacks them with dpkg -x into .deps/root, never into /.
#   .fixtures/  models/stories260K and models/uncomp-tiny from ../shared (golden files), since
#               ../shared does not travel.
# Everything carried counts against the device tree limit (64 MiB with the tracked tree, which
# is about 18 MiB), so the -dev packages are repacked without their static libraries (80 MB of
# the 95 MB they unpack to) and documentation, libopenblas0-openmp without liblapack.so.3 (we
# link libopenblas, which holds LAPACK), libgrpc29 without libgrpc_unsecure, and the identical
# uncomp-tiny weights are relative links to models/uncomp-tiny (the tracked copy, which travels).
# Usage: tests/cuda/fetch_deps.sh [--no-python] [--copy-weights]
set -u -o pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${UC_SHARED_DIR:-$root/../shared}
python=1
copy_weights=0
for a in "$@"; do
  case $a in
    --no-python) python=0 ;;
    --copy-weights) copy_weights=1 ;;
    *) echo "usage: $0 [--no-python] [--copy-weights]" >&2; exit 2 ;;
  esac
done

pkgs=(
  # engine and tests (what .deps held for the engine-only build)
  libcjson1 libcjson-dev libpcre2-8-0 libpcre2-dev
  libopenblas0-openmp libopenblas-openmp-dev libgfortran5 libquadmath0
  libcmocka0 libcmocka-dev libutf8proc2 libutf8proc-dev
  # uncompd + uncompctl: the gRPC C core, protobuf-c (and protoc-c, which needs libprotoc),
  # libmicrohttpd (metrics), pkgconf to read their .pc files in the unpacked tree
  libgrpc29 libgrpc-dev libprotobuf-c1 libprotobuf-c-dev protobuf-c-compiler
  libprotoc32 libprotobuf32 libabsl20220623 libre2-9 libc-ares2
  libmicrohttpd12 libmicrohttpd-dev pkgconf pkgconf-bin libpkgconf3
  # the Python suite's stubs are generated at run time (tests/e2e/grpc_client.py)
  protobuf-compiler protobuf-compiler-grpc
)
if [ $python = 1 ]; then
  pkgs+=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-grpcio
         python3-protobuf)
fi
# Not carried, on purpose: libsystemd-dev (optional in CMakeLists.txt: sd_notify is compiled out
# without it), libopenblas-dev (only the alternatives glue; CMake looks in the openmp folder),
# the libpcre2-16/32/posix packages libpcre2-dev depends on (we link libpcre2-8 by path), and
# libssl3, zlib, gnutls, libstdc++, which the GPU host has.

deps=$root/.deps
rm -rf "$deps"
mkdir -p "$deps" || exit 1
cd "$deps" || exit 1
apt-get download "${pkgs[@]}" > download.log 2>&1 ||
  { tail -20 download.log; echo "apt-get download failed (apt-get update first?)"; exit 1; }
rm -f download.log

# slim DEB PATTERN...: repacks DEB without the files matching the find -path patterns (and without
# documentation). dpkg -x does not check md5sums, so they are dropped rather than rewritten.
slim() {
  local deb=$1
  shift
  local tmp
  tmp=$(mktemp -d) || return 1
  dpkg-deb -R "$deb" "$tmp/p" || { rm -rf "$tmp"; return 1; }
  rm -rf "$tmp/p/usr/share/doc" "$tmp/p/usr/share/man" "$tmp/p/usr/share/info" \
    "$tmp/p/DEBIAN/md5sums"
  local pat
  for pat in "$@"; do
    find "$tmp/p" -path "$pat" -delete
  done
  dpkg-deb -Zxz -b "$tmp/p" "$deb" > /dev/null || { rm -rf "$tmp"; return 1; }
  rm -rf "$tmp"
}
for deb in *-dev_*.deb; do
  slim "$deb" '*.a' || exit 1
done
slim libopenblas0-openmp_*.deb '*/liblapack.so*' || exit 1
slim libgrpc29_*.deb '*/libgrpc_unsecure.so*' || exit 1

# fixtures: device_check.sh passes .fixtures as the shared folder (models/NAME/golden.json...)
fx=$root/.fixtures/models
rm -rf "$root/.fixtures"
mkdir -p "$fx" || exit 1
cp -r "$shared/models/stories260K" "$fx/" || exit 1
mkdir -p "$fx/uncomp-tiny" || exit 1
for f in "$shared"/models/uncomp-tiny/*; do
  b=$(basename "$f")
  if [ $copy_weights = 0 ] && cmp -s "$f" "$root/models/uncomp-tiny/$b"; then
    ln -s "../../../models/uncomp-tiny/$b" "$fx/uncomp-tiny/$b" || exit 1
  else
    cp "$f" "$fx/uncomp-tiny/" || exit 1
  fi
done
chmod -R u+w "$root/.fixtures"

ls -l "$deps"
echo "== .deps $(du -sb "$deps" | cut -f1) bytes in $(ls "$deps"/*.deb | wc -l) packages;" \
  ".fixtures $(du -sb "$root/.fixtures" | cut -f1) bytes" \
  "($(find "$fx" -type l | wc -l) links into models/)"
tree=$(cd "$root" && git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "== tracked tree $tree bytes;" \
  "device limit 67108864 for all that travels"

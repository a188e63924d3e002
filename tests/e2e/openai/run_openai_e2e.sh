#!/usr/bin/env bash
# The OpenAI-compatible HTTP front end to end (ctest `e2e_openai`): installs the official `openai`
# npm SDK into the build folder, starts uncompd (API keys, a chat template, small queue limits,
# metrics) and runs test_openai.mjs against it. Exits 77 (SKIPPED) when node or the npm registry
# is unreachable. Usage: run_openai_e2e.sh UNCOMPD MODEL_DIR WORK_DIR
set -uo pipefail
DAEMON=$1
MODEL=$2
WORK=$3
HERE=$(cd "$(dirname "$0")" && pwd)
PKGS=(openai@6.49.0)
NPM_DIR=${UC_OPENAI_NPM_DIR:-$WORK/npm_openai}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIPPED: node and npm are needed for the openai SDK"
    exit 77
fi
mkdir -p "$NPM_DIR"
if [ "$(cat "$NPM_DIR/.installed" 2>/dev/null)" != "${PKGS[*]}" ]; then
    if ! timeout 300 npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save \
            --fetch-timeout=20000 --fetch-retries=1 "${PKGS[@]}" >"$WORK/npm_openai.log" 2>&1; then
        echo "SKIPPED: npm install failed (registry unreachable?); see $WORK/npm_openai.log"
        tail -5 "$WORK/npm_openai.log"
        exit 77
    fi
    echo "${PKGS[*]}" >"$NPM_DIR/.installed"
fi
# ports from the process id, so parallel runs do not collide
base=$((20000 + ($$ % 2000) * 4))
GRPC=127.0.0.1:$base HTTP=127.0.0.1:$((base + 1)) METRICS=$((base + 2))
KEY=user-key-$$-abcdef ADMIN=admin-key-$$-abcdef
LOG=$WORK/openai_e2e_daemon.log
"$DAEMON" --model "$MODEL" --listen "$GRPC" --http-listen "$HTTP" --metrics-port "$METRICS" \
    --api-key "$KEY" --admin-api-key "$ADMIN" --served-model-name uncomp-tiny \
    --chat-template "$HERE/../../conformance/chat_templates/chatml.jinja" \
    --profile "$WORK/openai_e2e_profile.json" \
    --max-running 2 --max-queued-requests 4 --drain-timeout 20000 >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
for _ in $(seq 1 300); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$HTTP/health")" = 200 ]; then
        break
    fi
    if ! kill -0 $PID 2>/dev/null; then
        echo "uncompd exited at start-up:"; tail -20 "$LOG"; exit 1
    fi
    sleep 0.2
done
NODE_PATH="$NPM_DIR/node_modules" UC_HTTP="http://$HTTP" UC_GRPC="$GRPC" \
    UC_METRICS="http://127.0.0.1:$METRICS" UC_KEY="$KEY" UC_ADMIN_KEY="$ADMIN" UC_DAEMON_PID=$PID \
    UC_MODEL=uncomp-tiny timeout 240 node "$HERE/test_openai.mjs"
rc=$?
# the drain test sent SIGTERM: the daemon must exit 0 on its own
for _ in $(seq 1 150); do kill -0 $PID 2>/dev/null || break; sleep 0.2; done
if kill -0 $PID 2>/dev/null; then
    echo "FAIL: uncompd did not exit after the drain"; rc=1
else
    wait $PID; drc=$?
    if [ $drc -ne 0 ]; then echo "FAIL: uncompd exited $drc after the drain"; tail -20 "$LOG"; rc=1; fi
fi
trap - EXIT
[ $rc -eq 0 ] || { echo "--- daemon log (tail)"; tail -30 "$LOG"; }
exit $rc

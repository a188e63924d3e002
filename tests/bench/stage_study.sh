#!/usr/bin/env bash
# The uncomp-stage study: needle accuracy of uncomp-tiny for stage boundaries, r_min and row
# scores, beside full and uncomp at the same KV budget (UNCOMP.md section 9 and the UNComp issue).
# Usage: tests/bench/stage_study.sh EVAL_COMPRESS SHARED_DIR [extra eval_compress args...]
# (e.g. --backend cuda --fp32 1 on a GPU, where each configuration takes seconds).
set -u
eval_bin=$1
shared=$2
shift 2
common=(--shared "$shared" --lengths 2048,3072,4000 --trials 8 --ppl-segments 0 --budgets 128
        --grouping prompt "$@")
"$eval_bin" "${common[@]}" --policies full,snapkv,uncomp | grep -v '^#'
while read -r starts rmin score; do
    printf '== stage_starts=%s r_min=%s row_score=%s\n' "$starts" "$rmin" "$score"
    "$eval_bin" "${common[@]}" --policies uncomp-stage --stage-starts "$starts" --r-min "$rmin" \
        --row-score "$score" | grep '^uncomp-stage'
done <<'CONFIGS'
2,5 0.375 sum
2,5 0.375 max
2,5 0.375 accum
2,5 0.375 accum-max
4 0.5 sum
4 0.5 accum-max
5 0.375 sum
5 0.375 accum-max
6 0.375 sum
6,7 0.375 sum
3,6 0.625 sum
3,6 0.625 accum-max
4,6 0.5 sum
4,6 0.5 accum-max
CONFIGS

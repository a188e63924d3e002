"""What the client's inter-token percentiles are made of: the file of `uncompctl bench
--token-times` (one line per streamed chunk: SETTING REQUEST TOKENS SECONDS) summed up.

    python3 tests/bench/token_times.py FILE [--over MS]

For each setting: the gaps as the bench counts them (a chunk of n tokens gives n gaps of 1/n of
its interval), how many of them are each stream's first gap (from the first token to the second:
a prefill-first wave holds it back while the wave's other prompts prefill), and the gaps over
--over ms (default: the p99 of all) that are not first gaps, grouped into moments: a moment where
most streams got a late token at once is a slow step or a stall of the server's sends; a late
token of one stream alone, followed by a short gap (it caught up), is delivery jitter (the
client's threads or the transport).
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_trace import pct  # noqa: E402


def load(path):
    """{setting: {request: [(seconds, tokens), ...]}} in arrival order."""
    runs = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) == 4:
                runs[p[0]][int(p[1])].append((float(p[3]), int(p[2])))
    for reqs in runs.values():
        for a in reqs.values():
            a.sort()
    return runs


def gaps(reqs):
    """[(ms, end seconds, request, is_first, next gap ms)] as the bench counts them."""
    out = []
    for r, a in reqs.items():
        g = []
        for i in range(1, len(a)):
            ms = (a[i][0] - a[i - 1][0]) * 1e3 / a[i][1]
            g += [(ms, a[i][0], r, i == 1)] * a[i][1]
        for k, x in enumerate(g):
            out.append(x + (g[k + 1][0] if k + 1 < len(g) else None,))
    return out


def summary(path, over=None, window_ms=3.0):
    lines = []
    for setting, reqs in load(path).items():
        g = gaps(reqs)
        if not g:
            continue
        ms = sorted(x[0] for x in g)
        p50, p90, p99 = pct(ms, 0.5), pct(ms, 0.9), pct(ms, 0.99)
        thr = over if over is not None else p99
        first = [x for x in g if x[3]]
        late = sorted([x for x in g if not x[3] and x[0] > thr], key=lambda x: x[1])
        lines.append("%s: %d gaps, p50 %.2f / p90 %.2f / p99 %.2f ms; %d are streams' first "
                     "gaps (%d of them over %.2f ms); %d other gaps over %.2f ms" % (
                         setting, len(g), p50, p90, p99, len(first),
                         sum(1 for x in first if x[0] > thr), thr, len(late), thr))
        # moments: late gaps whose ends lie within window_ms of each other
        moments = []
        for x in late:
            if moments and (x[1] - moments[-1][-1][1]) * 1e3 <= window_ms:
                moments[-1].append(x)
            else:
                moments.append([x])
        n_streams = len(reqs)
        wide = [m for m in moments if len({x[2] for x in m}) * 2 >= n_streams]
        caught = sum(1 for x in late if x[4] is not None and x[4] < 0.7 * p50)
        lines.append("  in %d moments: %d with half the streams or more at once (a slow step or "
                     "a stall of the sends), %d of one to a few streams; %d late tokens were "
                     "followed by a short gap (they caught up: delivery jitter)" % (
                         len(moments), len(wide), len(moments) - len(wide), caught))
        for m in sorted(moments, key=lambda m: -len(m))[:8]:
            lines.append("  at %.3f s: %d streams, gaps %.1f-%.1f ms, next gaps %s ms" % (
                m[0][1], len({x[2] for x in m}), min(x[0] for x in m), max(x[0] for x in m),
                ",".join("%.1f" % x[4] for x in m[:6] if x[4] is not None)))
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--over", type=float, default=None)
    a = ap.parse_args()
    print("\n".join(summary(a.file, a.over)))

"""What the client's inter-token percentiles are made of: the file of `uncompctl bench
--token-times` (one line per streamed chunk: SETTING REQUEST TOKENS SECONDS ID MONOTONIC, then
the client's stall probe as '#stall MONOTONIC LATE_MS' lines) summed up, and, with the daemon's
`--send-trace`, where each chunk's time went on its way out.

    python3 tests/bench/token_times.py FILE [--over MS] [--send-trace FILE] [--step-trace FILE]

For each setting: the gaps as the bench counts them (a chunk of n tokens gives n gaps of 1/n of
its interval), how many of them are each stream's first gap (from the first token to the second:
a prefill-first wave holds it back while the wave's other prompts prefill), and the gaps over
--over ms (default: the p99 of all) that are not first gaps, grouped into moments: a moment where
most streams got a late token at once is a slow step or a stall of the server's sends; a late
token of one stream alone, followed by a short gap (it caught up), is delivery jitter (the
client's threads or the transport).

With --send-trace (uncompd --send-trace: one JSON line per sent chunk with the scheduler's
emission of its oldest and newest token, the hand-off to gRPC and the send's completion, on the
same monotonic clock as the client's arrivals), each client chunk is joined to the daemon's in
order per request id, and every chunk's delivery (emission of its oldest token to its arrival)
splits into the daemon's part before gRPC (emission to hand-off: the pump, or the stream's
previous send still in flight) and gRPC's part and after (hand-off to arrival: gRPC core, the
socket, the client's threads; whether the daemon's send op was late too tells its write from
what came after it). Each late moment then says which part made it late, on how many client
connections (the daemon's peers: `uncompctl bench` puts every client on one unless
--connections N), and whether the client's stall probe saw the host busy then.

With --step-trace as well (uncompd --step-trace: its lines carry `mono`, the step's start on the
same clock), each late moment names the step that emitted its tokens (the step running when the
newest of them left the scheduler): its kind, batch, engine time and graph, and how many decode
steps came between it and the last step with prefill work.
"""
import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_trace import load as load_steps, pct  # noqa: E402


def load_all(path):
    """({setting: {request: [chunk, ...]}}, [(monotonic, late ms)]); a chunk is a dict with
    's' (seconds from the run's start), 'n' (tokens), 'id' (the server's request id) and 'mono'
    (its arrival on the monotonic clock); chunks in arrival order."""
    runs = collections.defaultdict(lambda: collections.defaultdict(list))
    stalls = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) == 3 and p[0] == "#stall":
                stalls.append((float(p[1]), float(p[2])))
            elif len(p) >= 6 and not p[0].startswith("#"):  # the setting may hold spaces
                ch = {"s": float(p[-3]), "n": int(p[-4]), "id": p[-2], "mono": float(p[-1])}
                runs[" ".join(p[:-5])][int(p[-5])].append(ch)
    for reqs in runs.values():
        for a in reqs.values():
            a.sort(key=lambda c: c["s"])
    return runs, stalls


def load_sends(path):
    """{request id: [send, ...]} ordered by hand-off; a send is a line of uncompd --send-trace."""
    sends = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            try:
                d = json.loads(line)
            except ValueError:
                break  # a line cut short by a stopped daemon
            sends[d["req"]].append(d)
    for v in sends.values():
        v.sort(key=lambda d: d["start"])
    return sends


def join(reqs, sends):
    """Attaches to each client chunk its daemon send ('send'); returns (joined, unmatched): a
    request joins when it has as many sends as chunks, with the same token counts in order."""
    joined = unmatched = 0
    for a in reqs.values():
        v = sends.get(a[0].get("id")) if a else None
        if v is None or len(v) != len(a) or any(c["n"] != d["tokens"] for c, d in zip(a, v)):
            unmatched += len(a)
            continue
        for c, d in zip(a, v):
            c["send"] = d
        joined += len(a)
    return joined, unmatched


def parts_ms(c):
    """(delivery, daemon before gRPC, gRPC's send op, hand-off to arrival) of a joined chunk."""
    d = c["send"]
    return ((c["mono"] - d["emit_first"]) * 1e3, (d["start"] - d["emit_first"]) * 1e3,
            (d["done"] - d["start"]) * 1e3, (c["mono"] - d["start"]) * 1e3)


def gaps(reqs):
    """[(ms, end seconds, request, is_first, next gap ms, chunk)] as the bench counts them."""
    out = []
    for r, a in reqs.items():
        g = []
        for i in range(1, len(a)):
            ms = (a[i]["s"] - a[i - 1]["s"]) * 1e3 / a[i]["n"]
            g += [(ms, a[i]["s"], r, i == 1, a[i])] * a[i]["n"]
        for k, x in enumerate(g):
            out.append(x[:4] + (g[k + 1][0] if k + 1 < len(g) else None, x[4]))
    return out


def stat(v):
    return "%.2f / %.2f / %.2f" % (pct(v, 0.5), pct(v, 0.99), max(v)) if v else "-"


def step_of(steps, t):
    """(index, step) of the step running at monotonic time t (its start to its end), else the
    last one started before t; (None, None) when none is."""
    best = (None, None)
    for i, d in enumerate(steps):
        if "mono" not in d or d["mono"] > t:
            continue
        best = (i, d)
        if t <= d["mono"] + (d["plan_ms"] + d["engine_ms"] + d["after_ms"]) / 1e3:
            break
    return best


def step_words(steps, i):
    """A step described for a late moment: kind, batch, engine ms, graph, and where it stands
    after the last step with prefill work."""
    d = steps[i]
    since = 0
    for j in range(i, -1, -1):
        if steps[j]["prefill"] > 0:
            break
        since += steps[j]["decode"] > 0
    return "step %d (%s, batch %d, engine %.2f ms, graph %s; decode step %d since a prefill)" % (
        i, d["kind"], d["decode"], d["engine_ms"], d["graph"], since)


def send_lines(reqs, sends, stalls, moments, p50_gap, steps=None):
    """The --send-trace part of a setting's summary."""
    joined, unmatched = join(reqs, sends)
    lines = []
    chunks = [c for a in reqs.values() for c in a if "send" in c]
    if not chunks:
        return ["  send trace: no chunk of this setting joined (%d unmatched)" % unmatched]
    p = list(zip(*(parts_ms(c) for c in chunks)))
    peers = {c["send"].get("peer", "") for c in chunks}
    lines.append("  send trace: %d chunks joined, %d not, over %d client connection(s); ms p50 / "
                 "p99 / max: delivery (oldest token's emission to arrival) %s; in the daemon "
                 "before gRPC %s; gRPC's send op %s; hand-off to arrival %s" % (
                     joined, unmatched, len(peers), stat(p[0]), stat(p[1]), stat(p[2]),
                     stat(p[3])))
    base = [pct(v, 0.5) for v in p]
    for m in moments:
        cs = [x[5] for x in m if "send" in x[5]]
        if not cs:
            continue
        q = list(zip(*(parts_ms(c) for c in cs)))
        excess = pct([x[0] for x in m], 0.5) - p50_gap  # how late the moment's tokens came
        extra = {"the daemon before gRPC": pct(q[1], 0.5) - base[1],
                 "gRPC and after": pct(q[3], 0.5) - base[3]}
        if pct(q[0], 0.5) - base[0] < 0.5 * excess:
            where = "the emission (the tokens left the scheduler late: a slow step)"
        else:
            where = max(extra, key=extra.get)
            if where == "gRPC and after":  # was the daemon's write late, or what came after it?
                write = pct(q[2], 0.5) - base[2]
                where += (" (gRPC's send op on the daemon was late too: its write)"
                          if write >= 0.5 * extra[where] else
                          " (the daemon's sends completed on time: the socket or the client)")
        t0 = min(c["mono"] for c in cs) - max(x[0] for x in m) / 1e3
        t1 = max(c["mono"] for c in cs)
        busy = [s for s in stalls if t0 <= s[0] <= t1 + 0.001]
        if steps:
            i, _ = step_of(steps, pct([c["send"]["emit_last"] for c in cs], 0.5))
            where += "; emitted by %s" % (step_words(steps, i) if i is not None else
                                          "no step of the trace")
        lines.append("  moment at %.3f s (%d chunks on %d connection(s), %.1f ms late): delivery "
                     "%.1f ms (p50 of the run %.1f); before gRPC %.1f, hand-off to arrival %.1f "
                     "ms: the extra time is in %s; client probe: %s" % (
                         m[0][1], len(cs), len({c["send"].get("peer", "") for c in cs}), excess,
                         pct(q[0], 0.5), base[0], pct(q[1], 0.5),
                         pct(q[3], 0.5), where,
                         "woke %.1f ms late" % max(s[1] for s in busy) if busy
                         else "on time"))
    return lines


def summary(path, over=None, window_ms=3.0, send_trace=None, step_trace=None):
    lines = []
    runs, stalls = load_all(path)
    sends = load_sends(send_trace) if send_trace else None
    steps = load_steps(step_trace) if step_trace else None
    for setting, reqs in runs.items():
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
        spans = [(a[0]["s"], a[-1]["s"]) for a in reqs.values()]

        def streaming(t):  # requests between their first and last chunk at t
            return sum(1 for a, b in spans if a <= t <= b)
        wide = [m for m in moments if len({x[2] for x in m}) * 2 >= streaming(m[0][1])]
        caught = sum(1 for x in late if x[4] is not None and x[4] < 0.7 * p50)
        lines.append("  in %d moments: %d with half the streams or more at once (a slow step or "
                     "a stall of the sends), %d of one to a few streams; %d late tokens were "
                     "followed by a short gap (they caught up: delivery jitter)" % (
                         len(moments), len(wide), len(moments) - len(wide), caught))
        top = sorted(moments, key=lambda m: -len(m))[:8]
        for m in top:
            lines.append("  at %.3f s: %d of %d streams, gaps %.1f-%.1f ms, next gaps %s ms" % (
                m[0][1], len({x[2] for x in m}), streaming(m[0][1]), min(x[0] for x in m),
                max(x[0] for x in m),
                ",".join("%.1f" % x[4] for x in m[:6] if x[4] is not None)))
        if sends is not None:
            lines += send_lines(reqs, sends, stalls, top, p50, steps)
    if stalls:
        lines.append("client stall probe: %d wake-ups of a 1 ms sleep over 1 ms late, the worst "
                     "by %.1f ms" % (len(stalls), max(s[1] for s in stalls)))
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--over", type=float, default=None)
    ap.add_argument("--send-trace", default=None)
    ap.add_argument("--step-trace", default=None)
    a = ap.parse_args()
    print("\n".join(summary(a.file, a.over, send_trace=a.send_trace, step_trace=a.step_trace)))

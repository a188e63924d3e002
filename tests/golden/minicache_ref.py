#!/usr/bin/python3
"""MiniCache reference: a float32 numpy Llama forward of the uncomp-tiny fixture (safetensors
read directly) that merges the KV cache of adjacent layers the way arXiv 2405.14366 describes,
compared with the engine (tests/golden/test_minicache.c).

From the start layer S on, layers (S, S+1), (S+2, S+3), ... are pairs (a, b). Among the tokens
both layers of a pair keep (for a KV head), the angular distance arccos(cos) / pi of the two
layers' rotated keys and of their values is taken, and a token's distance is the larger of the
two; the round_half_up(gamma n) most distant of the n common tokens (ties to the lower position)
stay unmerged in both layers, the others are stored once: the SLERP at t of the two unit
directions (keys and values separately) and each layer's magnitudes, restored as
magnitude * direction. Decoded tokens are cached unmerged. Prefill attention is unchanged (the
merge applies to the cache the decode steps read).

The kept sets of the token policy come from the engine's dump (the selection itself is checked
against the PyTorch oracle elsewhere); everything from there on is recomputed here.

The pairs are the paper's from the dump's start layer, or the dump's "pairs" line when it has
one (a calibrated merge set: any disjoint adjacent pairs, tests/golden/test_minicache_calib.c).

Usage: minicache_ref.py GOLDEN_MINICACHE_BINARY SHARED_DIR. Runs the binary with
UC_MINICACHE_REF, then checks for "minicache" and "snapkv+minicache": the engine's merged sets
equal the reference's wherever the reference ranks the distances apart by more than 1e-5
relative, and the logits of every decode step are within 1e-4 of the reference relative to the
largest logit, while the unmerged cache's logits are farther than that (so the comparison sees
the merge). Or: minicache_ref.py --dump DUMP_FILE MODEL_DIR checks every record of a dump
written by another test the same way. Exit 77 (skipped) without numpy."""
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import numpy as np
    from np_llama import Model, softmax
except ImportError:
    print("numpy missing: skipped")
    sys.exit(77)

TIE_REL = 1e-5
LOGIT_REL = 1e-4


def round_half_up(x):
    return int(math.floor(x + 0.5))


def unit(x):
    x = x.astype(np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1.0), 0.0), n[..., 0]


def distance(xa, xb):
    """(n,) angular distances of the rows of xa and xb, in [0, 1]."""
    ua, na = unit(xa)
    ub, nb = unit(xb)
    c = np.clip((ua * ub).sum(axis=-1), -1.0, 1.0)
    return np.where((na > 0) & (nb > 0), np.arccos(c) / math.pi, 0.0)


def slerp(xa, xb, t):
    """Shared unit directions (n, D) of the rows of xa and xb, and their magnitudes."""
    ua, na = unit(xa)
    ub, nb = unit(xb)
    w = np.arccos(np.clip((ua * ub).sum(axis=-1), -1.0, 1.0))
    s = np.sin(w)
    small = (w < 1e-6) | (s < 1e-6)
    ss = np.where(small, 1.0, s)
    ca = np.where(small, 1.0 - t, np.sin((1.0 - t) * w) / ss)
    cb = np.where(small, t, np.sin(t * w) / ss)
    d = ca[:, None] * ua + cb[:, None] * ub
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    d = np.where(n > 0, d / np.where(n > 0, n, 1.0), 0.0)
    return d.astype(np.float32), na.astype(np.float32), nb.astype(np.float32)


def prefill(m, ids):
    """Rotated K and V (n, Hkv, D) of every layer, and the final residual stream."""
    n = len(ids)
    D, g = m.D, m.H // m.Hkv
    pos = np.arange(n)
    x = m.w["model.embed_tokens.weight"][ids].astype(np.float32)
    ks, vs = [], []
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for l in range(m.L):
        q, k, v = m.qkv(l, x, pos)
        att = np.empty((n, m.H, D), dtype=np.float32)
        for h in range(m.H):
            s = (q[:, h] @ k[:, h // g].T) / np.float32(math.sqrt(D)) + mask
            att[:, h] = softmax(s) @ v[:, h // g]
        ks.append(k)
        vs.append(v)
        x = m.finish(l, x, att)
    return ks, vs


def build_caches(m, ks, vs, kept, t, gamma, firsts, merge=True):
    """Per (layer, KV head) the cached keys and values after the merge of the pairs
    (a, a + 1), a in firsts, and the merged sets with the distances of the common tokens (for
    the tie check)."""
    caches = [[None] * m.Hkv for _ in range(m.L)]
    merged, dists = {}, {}
    for l in range(m.L):
        for j in range(m.Hkv):
            p = kept[(l, j)]
            caches[l][j] = (ks[l][p, j], vs[l][p, j])
    if not merge:
        return caches, merged, dists
    for a in firsts:
        b = a + 1
        for j in range(m.Hkv):
            pa, pb = kept[(a, j)], kept[(b, j)]
            common = sorted(set(pa) & set(pb))
            n = len(common)
            c = np.array(common, dtype=np.int64)
            d = np.maximum(distance(ks[a][c, j], ks[b][c, j]), distance(vs[a][c, j], vs[b][c, j]))
            k_ret = min(n, round_half_up(gamma * n))
            order = sorted(range(n), key=lambda i: (-d[i], i))
            ret = set(order[:k_ret])
            mg = [common[i] for i in range(n) if i not in ret]
            merged[(b, j)] = mg
            dists[(b, j)] = (common, d, d[order[k_ret - 1]] if k_ret > 0 else None)
            mset = set(mg)
            mi = np.array(mg, dtype=np.int64)
            kd, kna, knb = slerp(ks[a][mi, j], ks[b][mi, j], t)
            vd, vna, vnb = slerp(vs[a][mi, j], vs[b][mi, j], t)
            for layer, own, kn, vn in ((a, pa, kna, vna), (b, pb, knb, vnb)):
                o = np.array([x for x in own if x not in mset], dtype=np.int64)
                kc = np.concatenate([ks[layer][o, j], kn[:, None] * kd]).astype(np.float32)
                vc = np.concatenate([vs[layer][o, j], vn[:, None] * vd]).astype(np.float32)
                caches[layer][j] = (kc, vc)
    return caches, merged, dists


def decode(m, caches, steps):
    D, g = m.D, m.H // m.Hkv
    caches = [list(c) for c in caches]
    out = []
    for t, tok in steps:
        x = m.w["model.embed_tokens.weight"][[tok]].astype(np.float32)
        p = np.array([t])
        for l in range(m.L):
            q, k, v = m.qkv(l, x, p)
            att = np.empty((1, m.H, D), dtype=np.float32)
            for j in range(m.Hkv):
                kc, vc = caches[l][j]
                kc = np.concatenate([kc, k[:, j]])
                vc = np.concatenate([vc, v[:, j]])
                caches[l][j] = (kc, vc)
                for h in range(j * g, (j + 1) * g):
                    s = (q[0, h] @ kc.T) / np.float32(math.sqrt(D))
                    att[0, h] = softmax(s[None, :])[0] @ vc
            x = m.finish(l, x, att)
        out.append(m.logits(x)[0])
    return out


def parse_dump(path):
    """One record per policy: prompt, parameters, kept and merged sets, steps, logits."""
    recs, r = [], None
    with open(path) as f:
        for line in f:
            p = line.split()
            if p[0] == "policy":
                r = {"policy": p[1], "kept": {}, "merged": {}, "steps": [], "logits": []}
                recs.append(r)
            elif p[0] == "prompt":
                r["ids"] = [int(x) for x in p[2:]]
            elif p[0] == "params":
                r["t"], r["gamma"], r["start"] = float(p[2]), float(p[4]), int(p[6])
            elif p[0] == "pairs":
                r["pairs"] = [int(x) for x in p[1:]]
            elif p[0] in ("kept", "merged"):
                r[p[0]][(int(p[1]), int(p[2]))] = [int(x) for x in p[3:]]
            elif p[0] == "step":
                r["steps"].append(int(p[2]))
                r["logits"].append(np.array([float(x) for x in p[3:]], dtype=np.float32))
    return recs


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def check(m, r):
    fails = 0
    ids = r["ids"]
    n = len(ids)
    ks, vs = prefill(m, ids)
    firsts = r.get("pairs", list(range(r["start"], m.L - 1, 2)))
    seconds = {a + 1 for a in firsts}
    # the engine lists a pair's second layer's own tokens; its whole kept set adds the merged
    kept = dict(r["kept"])
    for (l, j), mg in r["merged"].items():
        if mg and l in seconds:
            kept[(l, j)] = sorted(set(kept[(l, j)]) | set(mg))
    caches, merged, dists = build_caches(m, ks, vs, kept, r["t"], r["gamma"], firsts)
    ties = total = 0
    for (l, j), mg in merged.items():
        e = set(r["merged"].get((l, j), []))
        total += len(mg)
        common, d, bound = dists[(l, j)]
        for x in e ^ set(mg):
            dx = d[common.index(x)] if x in common else None
            if dx is not None and bound is not None and abs(dx - bound) <= TIE_REL * bound:
                ties += 1
                continue
            print(f"FAIL: {r['policy']}: layer {l} KV head {j}: position {x} "
                  f"{'merged' if x in e else 'kept unmerged'} by the engine (distance {dx}, "
                  f"boundary {bound})")
            fails += 1
    print(f"{r['policy']}: pairs {[(a, a + 1) for a in firsts]}: merged sets of {len(merged)} "
          f"(pair, KV head)s, {total} tokens, {ties} near-tie difference(s)")
    steps = [(n + i, t) for i, t in enumerate(r["steps"])]
    ref = decode(m, caches, steps)
    for i, (a, b) in enumerate(zip(r["logits"], ref)):
        d = rel(a, b)
        print(f"{r['policy']}: decode step {i}: max |engine - reference| / max |logit| = "
              f"{d:.2e}, argmax {int(np.argmax(a))} vs {int(np.argmax(b))}")
        if d > LOGIT_REL:
            print(f"FAIL: step {i} logits differ by {d:.2e} relative (> {LOGIT_REL:g})")
            fails += 1
    plain, _, _ = build_caches(m, ks, vs, kept, r["t"], r["gamma"], firsts, merge=False)
    far = max(rel(a, b) for a, b in zip(r["logits"], decode(m, plain, steps)))
    print(f"{r['policy']}: unmerged cache: max relative difference to the engine {far:.2e}")
    if far <= LOGIT_REL:
        print("FAIL: the engine's logits are as close to the unmerged cache's: nothing merged?")
        fails += 1
    return fails


def check_dump(dump, model_dir):
    """Every record of a dump another test wrote."""
    recs = parse_dump(dump)
    m = Model(model_dir)
    fails = 0 if recs else 1
    for x in recs:
        fails += check(m, x)
    print("PASSED" if fails == 0 else f"FAILED: {fails} failure(s)")
    return 1 if fails else 0


def main():
    if sys.argv[1] == "--dump":
        return check_dump(sys.argv[2], sys.argv[3])
    binary, shared = sys.argv[1], sys.argv[2]
    model_dir = os.path.join(shared, "models", "uncomp-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "minicache.txt")
        env = dict(os.environ, UC_MINICACHE_REF=dump)
        r = subprocess.run([binary, shared], env=env, capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            print(f"FAIL: {binary} exited {r.returncode}")
            return 1
        recs = parse_dump(dump)
    m = Model(model_dir)
    fails = 0
    if [x["policy"] for x in recs] != ["minicache", "snapkv+minicache"]:
        print(f"FAIL: the dump holds {[x['policy'] for x in recs]}")
        return 1
    for x in recs:
        fails += check(m, x)
    print("PASSED" if fails == 0 else f"FAILED: {fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

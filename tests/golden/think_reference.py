#!/usr/bin/python3
"""ThinK reference: a float32 numpy Llama forward of the uncomp-tiny fixture (safetensors read
directly) that prunes key channels the way arXiv 2407.21018 describes, compared with the engine.

For every layer and KV head, channel c of the (rotated) prompt keys scores
||Q_win[:, c]|| * ||K[:, c]|| summed over the KV head's query heads, Q_win the last `window`
rotated query rows; the head keeps the D - floor(ratio D) best channels (ties to the lower
channel). Decoding multiplies only those channels of the query with the cached keys (scale
1/sqrt(D) as before) and caches a new token's kept channels only.

Usage: think_reference.py GOLDEN_THINK_BINARY SHARED_DIR. Runs the binary with UC_THINK_REF
to get the prompt, the engine's kept channels and its decode logits, then checks: the kept
channels equal the reference's wherever the reference ranks them apart by more than 1e-4
relative (closer scores are near-ties that float32 rounding may order either way), and the
logits of every decode step are within 1e-4 of the reference relative to the largest logit,
while the unpruned model's logits are farther than that (so the comparison sees the pruning).
Exit 77 (skipped) without numpy."""
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

TIE_REL = 1e-4
LOGIT_REL = 1e-4


def think_scores(m, q, k, window):
    """(Hkv, D) channel scores from the window's rotated queries and the rotated keys."""
    g = m.H // m.Hkv
    qw = q[-window:].astype(np.float64)  # (W, H, D)
    qn = np.sqrt((qw * qw).sum(axis=0))  # (H, D)
    kk = k.astype(np.float64)
    kn = np.sqrt((kk * kk).sum(axis=0))  # (Hkv, D)
    return np.stack([qn[j * g:(j + 1) * g].sum(axis=0) * kn[j] for j in range(m.Hkv)])


def kept_channels(score, kdim):
    order = sorted(range(len(score)), key=lambda c: (-score[c], c))
    return sorted(order[:kdim])


def run_reference(m, ids, ratio, window, steps):
    """Kept channels (L, Hkv) and the logits of each teacher-forced decode step."""
    n = len(ids)
    D, g = m.D, m.H // m.Hkv
    kdim = D - int(math.floor(round(ratio * D * 1e6) / 1e6))
    pos = np.arange(n)
    x = m.w["model.embed_tokens.weight"][ids].astype(np.float32)
    caches, chans, scores = [], [], []
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for l in range(m.L):
        q, k, v = m.qkv(l, x, pos)
        att = np.empty((n, m.H, D), dtype=np.float32)
        for h in range(m.H):
            s = (q[:, h] @ k[:, h // g].T) / np.float32(math.sqrt(D)) + mask
            att[:, h] = softmax(s) @ v[:, h // g]
        sc = think_scores(m, q, k, min(window, n))
        ch = [kept_channels(sc[j], kdim) for j in range(m.Hkv)]
        chans.append(ch)
        scores.append(sc)
        caches.append([(k[:, j][:, ch[j]], v[:, j]) for j in range(m.Hkv)])
        x = m.finish(l, x, att)
    out = []
    for t, tok in steps:
        x = m.w["model.embed_tokens.weight"][[tok]].astype(np.float32)
        p = np.array([t])
        for l in range(m.L):
            q, k, v = m.qkv(l, x, p)
            att = np.empty((1, m.H, D), dtype=np.float32)
            for j in range(m.Hkv):
                ch = chans[l][j]
                kc, vc = caches[l][j]
                kc = np.concatenate([kc, k[:, j][:, ch]])
                vc = np.concatenate([vc, v[:, j]])
                caches[l][j] = (kc, vc)
                for h in range(j * g, (j + 1) * g):
                    s = (q[0, h][ch] @ kc.T) / np.float32(math.sqrt(D))
                    att[0, h] = softmax(s[None, :])[0] @ vc
            x = m.finish(l, x, att)
        out.append(m.logits(x)[0])
    return chans, scores, out


def parse_dump(path):
    ids, chans, steps, logits = None, {}, [], []
    ratio = window = None
    with open(path) as f:
        for line in f:
            p = line.split()
            if p[0] == "prompt":
                ids = [int(t) for t in p[2:]]
            elif p[0] == "ratio":
                ratio, window = float(p[1]), int(p[3])
            elif p[0] == "chan":
                chans[(int(p[1]), int(p[2]))] = [int(t) for t in p[3:]]
            elif p[0] == "step":
                steps.append(int(p[2]))
                logits.append(np.array([float(t) for t in p[3:]], dtype=np.float32))
    return ids, ratio, window, chans, steps, logits


def main():
    binary, shared = sys.argv[1], sys.argv[2]
    model_dir = os.path.join(shared, "models", "uncomp-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "think.txt")
        env = dict(os.environ, UC_THINK_REF=dump)
        r = subprocess.run([binary, shared], env=env, capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            print(f"FAIL: {binary} exited {r.returncode}")
            return 1
        ids, ratio, window, echans, toks, elogits = parse_dump(dump)
    m = Model(model_dir)
    n = len(ids)
    steps = [(n + i, t) for i, t in enumerate(toks)]
    chans, scores, rlogits = run_reference(m, ids, ratio, window, steps)
    fails = 0
    ties = 0
    for l in range(m.L):
        for j in range(m.Hkv):
            e, r = set(echans[(l, j)]), set(chans[l][j])
            if e == r:
                continue
            sc = scores[l][j]
            kth = sorted(sc, reverse=True)[len(r) - 1]
            for c in e ^ r:
                if abs(sc[c] - kth) > TIE_REL * abs(kth):
                    print(f"FAIL: layer {l} KV head {j}: channel {c} "
                          f"{'kept' if c in e else 'dropped'} by the engine, score {sc[c]:.6g} "
                          f"vs the boundary {kth:.6g}")
                    fails += 1
                else:
                    ties += 1
    print(f"kept channels: {m.L * m.Hkv} heads, {len(chans[0][0])} of {m.D} channels each, "
          f"{ties} near-tie difference(s)")
    for i, (a, b) in enumerate(zip(elogits, rlogits)):
        rel = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
        print(f"decode step {i}: max |engine - reference| / max |logit| = {rel:.2e}, "
              f"argmax {int(np.argmax(a))} vs {int(np.argmax(b))}")
        if rel > LOGIT_REL:
            print(f"FAIL: step {i} logits differ by {rel:.2e} relative (> {LOGIT_REL:g})")
            fails += 1
    _, _, flogits = run_reference(m, ids, 0.0, window, steps)
    far = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
              for a, b in zip(elogits, flogits))
    print(f"unpruned reference: max relative difference to the engine {far:.2e}")
    if far <= LOGIT_REL:
        print("FAIL: the engine's logits are as close to the unpruned model's: nothing pruned?")
        fails += 1
    print("PASSED" if fails == 0 else f"FAILED: {fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

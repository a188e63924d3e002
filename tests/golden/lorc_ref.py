#!/usr/bin/python3
"""LoRC reference: a float32 numpy Llama forward of the uncomp-tiny fixture (np_llama.py's model,
safetensors read directly) whose KV cache holds low-rank latents the way arXiv 2410.03111
describes, compared with the engine.

For each layer l and KV head j, the D x C slices W_k, W_v of the key and value projections are
decomposed (numpy SVD in float64, independently of the engine's eigensolver): the layer's
sensitivity is the mean over KV heads of log(s_max / s_min) of W_k plus that of W_v; the
cumulative sums over layers i >= l, normalised to u_l in [0, 1], give rank
r_l = round_half_up(min(D, max(1, c w_l))), w_l = (0.5 + u_l) / mean(0.5 + u) and c such that the
clipped values sum to rho D L (bisection, as compress/lorc.c does). The prefill attends over the
exact K/V; the cache keeps, per token, z_k = U_r^T k (k before RoPE) and z_v = U_r^T v (U_r the
first r left singular vectors, in float32). Decoding rebuilds each key as U_r z_k, rotates it at
the token's position, and takes U_r (sum_t p_t z_v,t) as the head's output; a new token is cached
as latents too.

Usage: lorc_ref.py GOLDEN_LORC_BINARY SHARED_DIR. Runs the binary with UC_LORC_REF to get the
prompt, the engine's sensitivities, ranks and decode logits, then checks: the sensitivities
within 1e-6 relative, the ranks equal, the logits of every decode step within 1e-4 of the
reference relative to the largest logit, while the uncompressed model's logits are farther than
that (so the comparison sees the compression). Exit 77 (skipped) without numpy."""
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

COND_REL = 1e-6
LOGIT_REL = 1e-4


def bases(m):
    """Per layer: log sensitivity, and per KV head (U_k, U_v) as (D, D) float32, columns the left
    singular vectors, largest first."""
    D = m.D
    sens, us = [], []
    for l in range(m.L):
        wk = m.lw(l, "self_attn.k_proj").astype(np.float64)
        wv = m.lw(l, "self_attn.v_proj").astype(np.float64)
        tot, heads = 0.0, []
        for j in range(m.Hkv):
            pair = []
            for w in (wk, wv):
                u, s, _ = np.linalg.svd(w[j * D:(j + 1) * D], full_matrices=False)
                tot += math.log(s[0] / max(s[-1], s[0] * 1e-30))
                pair.append(u.astype(np.float32))
            heads.append(pair)
        sens.append(tot / m.Hkv)
        us.append(heads)
    return sens, us


def ranks(sens, D, rho):
    """The same arithmetic as compress/lorc.c, operation for operation (IEEE doubles)."""
    L = len(sens)
    cum, us = 0.0, [0.0] * L
    for l in range(L - 1, -1, -1):
        cum += sens[l]
        us[l] = cum
    lo, hi = min(us), max(us)
    us = [0.5 + ((x - lo) / (hi - lo) if hi > lo else 0.5) for x in us]
    mean = 0.0
    for x in us:
        mean += x
    mean /= L
    w = [x / mean for x in us]
    d = float(D)
    r = round(rho * 1e6) / 1e6
    target = r * d * L

    def total(c):
        t = 0.0
        for x in w:
            y = c * x
            t += 1.0 if y < 1.0 else (d if y > d else y)
        return t

    c_lo, c_hi = 0.0, d / min(w)
    for _ in range(200):
        c = 0.5 * (c_lo + c_hi)
        if total(c) < target:
            c_lo = c
        else:
            c_hi = c
    out = []
    for x in w:
        y = c_hi * x
        y = 1.0 if y < 1.0 else (d if y > d else y)
        out.append(int(min(D, max(1, math.floor(y + 0.5)))))
    return out


def run_reference(m, ids, rk, us, steps):
    """Logits of each teacher-forced decode step with latent caches of ranks rk (None: exact)."""
    n = len(ids)
    D, g = m.D, m.H // m.Hkv
    pos = np.arange(n)
    x = m.w["model.embed_tokens.weight"][ids].astype(np.float32)
    caches = []
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for l in range(m.L):
        h = m.norm(x, m.lw(l, "input_layernorm"))
        kraw = (h @ m.lw(l, "self_attn.k_proj").T).reshape(n, m.Hkv, D)
        q, k, v = m.qkv(l, x, pos)
        att = np.empty((n, m.H, D), dtype=np.float32)
        for hh in range(m.H):
            s = (q[:, hh] @ k[:, hh // g].T) / np.float32(math.sqrt(D)) + mask
            att[:, hh] = softmax(s) @ v[:, hh // g]
        layer = []
        for j in range(m.Hkv):
            if rk is None:
                layer.append((k[:, j], v[:, j], list(pos)))
            else:
                uk, uv = us[l][j][0][:, :rk[l]], us[l][j][1][:, :rk[l]]
                layer.append((kraw[:, j] @ uk, v[:, j] @ uv, list(pos)))
        caches.append(layer)
        x = m.finish(l, x, att)
    out = []
    for t, tok in steps:
        x = m.w["model.embed_tokens.weight"][[tok]].astype(np.float32)
        p = np.array([t])
        for l in range(m.L):
            h = m.norm(x, m.lw(l, "input_layernorm"))
            kraw = (h @ m.lw(l, "self_attn.k_proj").T).reshape(1, m.Hkv, D)
            q, k, v = m.qkv(l, x, p)
            att = np.empty((1, m.H, D), dtype=np.float32)
            for j in range(m.Hkv):
                kc, vc, ps = caches[l][j]
                if rk is None:
                    kc, vc = np.concatenate([kc, k[:, j]]), np.concatenate([vc, v[:, j]])
                    ps = ps + [t]
                    keys, uv = kc, None
                else:
                    uk, uv = us[l][j][0][:, :rk[l]], us[l][j][1][:, :rk[l]]
                    kc = np.concatenate([kc, kraw[:, j] @ uk])
                    vc = np.concatenate([vc, v[:, j] @ uv])
                    ps = ps + [t]
                    keys = m.rope((kc @ uk.T)[:, None, :], np.array(ps))[:, 0]
                caches[l][j] = (kc, vc, ps)
                for hh in range(j * g, (j + 1) * g):
                    s = (q[0, hh] @ keys.T) / np.float32(math.sqrt(D))
                    pr = softmax(s[None, :])[0]
                    att[0, hh] = pr @ vc if uv is None else (pr @ vc) @ uv.T
            x = m.finish(l, x, att)
        out.append(m.logits(x)[0])
    return out


def parse_dump(path):
    ids, sens, rk, steps, logits, ratio = None, [], [], [], [], None
    with open(path) as f:
        for line in f:
            p = line.split()
            if p[0] == "prompt":
                ids = [int(t) for t in p[2:]]
            elif p[0] == "ratio":
                ratio = float(p[1])
            elif p[0] == "layer":
                sens.append(float(p[2]))
                rk.append(int(p[3]))
            elif p[0] == "step":
                steps.append(int(p[2]))
                logits.append(np.array([float(t) for t in p[3:]], dtype=np.float32))
    return ids, ratio, sens, rk, steps, logits


def main():
    binary, shared = sys.argv[1], sys.argv[2]
    model_dir = os.path.join(shared, "models", "uncomp-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "lorc.txt")
        env = dict(os.environ, UC_LORC_REF=dump)
        r = subprocess.run([binary, shared], env=env, capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            print(f"FAIL: {binary} exited {r.returncode}")
            return 1
        ids, ratio, esens, erk, toks, elogits = parse_dump(dump)
    m = Model(model_dir)
    n = len(ids)
    steps = [(n + i, t) for i, t in enumerate(toks)]
    sens, us = bases(m)
    rk = ranks(sens, m.D, ratio)
    fails = 0
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(esens, sens))
    print(f"sensitivities (log condition numbers): {len(sens)} layers, max relative "
          f"difference {worst:.2e}; ranks engine {erk} reference {rk}")
    if len(esens) != m.L or worst > COND_REL:
        print(f"FAIL: sensitivities differ by {worst:.2e} (> {COND_REL:g})")
        fails += 1
    if erk != rk:
        print("FAIL: ranks differ")
        fails += 1
    rlogits = run_reference(m, ids, rk, us, steps)
    for i, (a, b) in enumerate(zip(elogits, rlogits)):
        rel = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
        print(f"decode step {i}: max |engine - reference| / max |logit| = {rel:.2e}, "
              f"argmax {int(np.argmax(a))} vs {int(np.argmax(b))}")
        if rel > LOGIT_REL:
            print(f"FAIL: step {i} logits differ by {rel:.2e} relative (> {LOGIT_REL:g})")
            fails += 1
    flogits = run_reference(m, ids, None, us, steps)
    far = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
              for a, b in zip(elogits, flogits))
    print(f"uncompressed reference: max relative difference to the engine {far:.2e}")
    if far <= LOGIT_REL:
        print("FAIL: the engine's logits are as close to the uncompressed model's: nothing "
              "compressed?")
        fails += 1
    print("PASSED" if fails == 0 else f"FAILED: {fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""KVSharer reference in float32 numpy (no PyTorch): a Llama forward pass over a fixture's
safetensors in which layer b may attend over layer a's (RoPE'd) keys and values instead of its
own, the calibration decision (layer pairs ranked by the Euclidean distance of their caches
averaged over windows, accepted greedily while the last layer's output rows keep a mean cosine
similarity above the threshold against the unshared model), and the logits after sharing.

Usage: kvsharer_ref.py MODEL_DIR IN.json  (prints JSON on stdout)
IN: {"calib": [ids], "window": W, "threshold": T, "target": n, "prompt": [ids], "n_logits": k,
     "pairs": [[a, b], ...] (optional: the logits use these instead of the calibrated pairs)}
OUT: {"dist2": L x L, "pairs": [[a, b]], "cosine": c, "tried": n, "logits": k x V (the last k
      positions of the prompt)}
Exits 77 when numpy is missing (the ctest test is then skipped)."""
import json
import os
import struct
import sys

try:
    import numpy as np
except ImportError:
    sys.stderr.write("kvsharer_ref: numpy is missing\n")
    sys.exit(77)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = data[a:b]
        dt = meta["dtype"]
        if dt == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        elif dt == "F32":
            arr = np.frombuffer(raw, dtype=np.float32).copy()
        else:
            raise SystemExit("kvsharer_ref: dtype %s not supported" % dt)
        out[name] = arr.reshape(meta["shape"])
    return out


def load_model(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = {}
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) \
        else ["model.safetensors"]
    for f in files:
        w.update(read_safetensors(os.path.join(d, f)))
    return cfg, w


class Model:
    def __init__(self, d):
        self.cfg, self.w = load_model(d)
        c = self.cfg
        self.L = c["num_hidden_layers"]
        self.H = c["num_attention_heads"]
        self.Hkv = c["num_key_value_heads"]
        self.C = c["hidden_size"]
        self.D = c.get("head_dim") or self.C // self.H
        self.eps = np.float32(c.get("rms_norm_eps", 1e-5))
        theta = c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 10000.0)
        self.inv_freq = (1.0 / (theta ** (np.arange(0, self.D, 2, dtype=np.float64) / self.D))
                         ).astype(np.float32)
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])

    def norm(self, x, wname):
        v = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return (x / np.sqrt(v + self.eps)) * self.w[wname]

    def rope(self, x, n):  # x: (n, heads, D)
        ang = np.arange(n, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        h = self.D // 2
        a, b = x[..., :h], x[..., h:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def forward(self, ids, src_of=None):
        """Returns (last layer's output rows (n, C), per-layer [K|V] (n, 2 Hkv D), final x)."""
        n = len(ids)
        L, H, Hkv, D = self.L, self.H, self.Hkv, self.D
        src_of = src_of or list(range(L))
        x = self.w["model.embed_tokens.weight"][np.asarray(ids)].astype(np.float32)
        kv = [None] * L
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        for l in range(L):
            p = "model.layers.%d." % l
            h = self.norm(x, p + "input_layernorm.weight")
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).reshape(n, H, D)
            q = self.rope(q, n)
            if src_of[l] == l:
                k = (h @ self.w[p + "self_attn.k_proj.weight"].T).reshape(n, Hkv, D)
                v = (h @ self.w[p + "self_attn.v_proj.weight"].T).reshape(n, Hkv, D)
                kv[l] = (self.rope(k, n), v)
            k, v = kv[src_of[l]]
            g = H // Hkv
            out = np.empty((n, H, D), dtype=np.float32)
            for hh in range(H):
                s = (q[:, hh, :] @ k[:, hh // g, :].T) / np.float32(np.sqrt(D)) + mask
                s = s - s.max(axis=-1, keepdims=True)
                pr = np.exp(s)
                pr = pr / pr.sum(axis=-1, keepdims=True)
                out[:, hh, :] = pr @ v[:, hh // g, :]
            x = x + out.reshape(n, H * D) @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, p + "post_attention_layernorm.weight")
            gt = h @ self.w[p + "mlp.gate_proj.weight"].T
            up = h @ self.w[p + "mlp.up_proj.weight"].T
            act = gt / (np.float32(1.0) + np.exp(-gt)) * up
            x = x + act @ self.w[p + "mlp.down_proj.weight"].T
        flat = [None if kv[l] is None else
                np.concatenate([kv[l][0].reshape(n, Hkv * D), kv[l][1].reshape(n, Hkv * D)], 1)
                for l in range(L)]
        return x, flat

    def logits(self, x):
        return self.norm(x, "model.norm.weight") @ self.lm_head.T


def src_map(L, pairs):
    m = list(range(L))
    for a, b in pairs:
        m[b] = a
    return m


def cos_rows_mean(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(1)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return float(np.mean(num / den))


def calibrate(m, calib, window, threshold, target):
    L = m.L
    nw = min(len(calib) // window, 16)
    wins = [calib[i * window:(i + 1) * window] for i in range(nw)]
    base, sums = [], None
    for wi in wins:
        x, kv = m.forward(wi)
        base.append(x)
        st = np.stack([k.astype(np.float64) for k in kv])
        sums = st if sums is None else sums + st
    mean = sums / nw
    dist2 = np.zeros((L, L))
    for a in range(L):
        for b in range(a + 1, L):
            dist2[a, b] = dist2[b, a] = float(((mean[a] - mean[b]) ** 2).sum())
    cand = sorted([(a, b) for a in range(L) for b in range(a + 1, L)],
                  key=lambda p: (-dist2[p[0], p[1]], p[0], p[1]))
    role = [0] * L
    pairs, cosine, tried = [], 1.0, 0
    for a, b in cand:
        if len(pairs) >= target:
            break
        if role[b] or role[a] == "t":
            continue
        trial = pairs + [(a, b)]
        sm = src_map(L, trial)
        cs = float(np.mean([cos_rows_mean(m.forward(wi, sm)[0], bx) for wi, bx in zip(wins, base)]))
        tried += 1
        if cs > threshold:
            pairs = trial
            cosine = cs
            role[a], role[b] = "s", "t"
    return dist2, pairs, cosine, tried


def main():
    m = Model(sys.argv[1])
    q = json.load(open(sys.argv[2]))
    dist2, pairs, cosine, tried = calibrate(m, q["calib"], q["window"], q["threshold"],
                                            q["target"])
    use = [tuple(p) for p in q["pairs"]] if "pairs" in q else pairs
    x, _ = m.forward(q["prompt"], src_map(m.L, use))
    k = q.get("n_logits", 1)
    lg = m.logits(x[-k:])
    json.dump({"dist2": dist2.tolist(), "pairs": [list(p) for p in pairs], "cosine": cosine,
               "tried": tried, "logits": lg.astype(np.float64).tolist()}, sys.stdout)


if __name__ == "__main__":
    main()

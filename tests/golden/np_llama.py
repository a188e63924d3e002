"""A float32 numpy Llama of the fixtures, for the reference scripts of the compression stages
(think_reference.py, minicache_ref.py, lorc_ref.py): the safetensors shards read directly (no
PyTorch), the layer split where the stages need it (Q/K/V with RoPE, then the rest of the
layer), and the logits."""
import json
import os
import struct

import numpy as np


def load_tensors(model_dir):
    """Every tensor of the model's safetensors shards, as float32 arrays."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, name), "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
            data = f.read()
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            raw = data[a:b]
            if meta["dtype"] == "BF16":
                u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = u.view(np.float32)
            elif meta["dtype"] == "F16":
                arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
            elif meta["dtype"] == "F32":
                arr = np.frombuffer(raw, dtype=np.float32).copy()
            else:
                raise SystemExit(f"unsupported dtype {meta['dtype']}")
            out[key] = arr.reshape(meta["shape"])
    return out


class Model:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        self.L = c["num_hidden_layers"]
        self.H = c["num_attention_heads"]
        self.Hkv = c["num_key_value_heads"]
        self.C = c["hidden_size"]
        self.D = c.get("head_dim") or self.C // self.H
        self.eps = np.float32(c["rms_norm_eps"])
        theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
        self.inv_freq = (1.0 / (theta ** (np.arange(0, self.D, 2, dtype=np.float64) / self.D)))
        self.w = load_tensors(model_dir)
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def lw(self, l, name):
        return self.w[f"model.layers.{l}.{name}.weight"]

    def norm(self, x, w):
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return (x / np.sqrt(ms + self.eps)).astype(np.float32) * w

    def rope(self, x, pos):
        """x (T, heads, D), rotate-half, positions pos (T)."""
        ang = np.outer(pos, self.inv_freq)
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        h = self.D // 2
        a, b = x[..., :h], x[..., h:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(np.float32)

    def qkv(self, l, x, pos):
        h = self.norm(x, self.lw(l, "input_layernorm"))
        q = (h @ self.lw(l, "self_attn.q_proj").T).reshape(len(x), self.H, self.D)
        k = (h @ self.lw(l, "self_attn.k_proj").T).reshape(len(x), self.Hkv, self.D)
        v = (h @ self.lw(l, "self_attn.v_proj").T).reshape(len(x), self.Hkv, self.D)
        return self.rope(q, pos), self.rope(k, pos), v

    def finish(self, l, x, att):
        x = x + att.reshape(len(x), -1) @ self.lw(l, "self_attn.o_proj").T
        h = self.norm(x, self.lw(l, "post_attention_layernorm"))
        g = h @ self.lw(l, "mlp.gate_proj").T
        u = h @ self.lw(l, "mlp.up_proj").T
        act = (g / (1.0 + np.exp(-g))).astype(np.float32) * u
        return (x + act @ self.lw(l, "mlp.down_proj").T).astype(np.float32)

    def logits(self, x):
        return self.norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T


def softmax(s):
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)

"""Serving benchmark on a GPU host (issue 11, item 5): uncompd on a Llama-3-8B-shaped model with
random weights, loaded by `uncompctl bench`, against the engine-only floor that bench_gpu
measures on the same model in the same run.

    python3 tests/bench/serve_gpu.py --build BUILD_DIR [--workloads all|a,b,c,d,e]
        [--shape llama8b|tiny] [--model-dir DIR] [--backend cuda|cpu] [--daemon-args "..."]

Steps:
  1. Writes the model folder (HF layout, bf16 safetensors shards, the bundled tokenizer), or
     reuses it when its .uncomp_shape says the same shape. Weights: one random block (std 0.02)
     tiled at a different offset per tensor, norms 1.0: ~14 GiB in seconds, no torch needed.
  2. bench_gpu on that folder: prefill tokens/s at each prompt length and the decode step time
     at each (batch, context) the workloads need.
  3. Per workload a daemon (restarted when the pool or batch limits change), a warm-up, then
     `uncompctl bench --json` with the same seed for every setting (--compare).
  4. A table: measured vs floor, and the issue's targets as PASS/FAIL lines.

Workloads (llama8b shape; `--shape tiny` scales all of them down for a CPU dry run):
  a  1 client, 512-token prompts, 256 out (8 requests)           pool 80 GiB, batch 128
  b  64 x 8192-token prompts, 128 out, 32 clients:
     full vs uncomp at 10% (kv_budget 819, grouping=prompt)        pool 80 GiB, batch 128
  c  64 x 4096-token prompts, 1024 out, 64 clients:
     full vs uncomp@410 (both groupings) vs snapkv@410             pool 8 GiB, batch 128
  d  256 x 1024-token prompts, 512 out, 256 clients:
     full vs uncomp@128 (both groupings) vs snapkv@128             pool 100 GiB, batch 256
  e  32 x 512-token prompts, 256 out, 8 clients (a few chats: decode batches of 1-8)
The 100 GiB of (d): an H200 has 140 GiB; the model takes 13 GiB of weights, bf16 workspaces
for 8192-row prefill slices and cuBLAS a few more; 100 GiB leaves ~20 GiB spare. On an 80 GB
card those pools are cut to what their running sequences need in full (b 33 GiB, d 48 GiB; the
log says so), which keeps the decode batches and the floors; `--pool W=SIZE` sets one by hand,
and the daemon names a pool that does not fit. uncomp runs
with its default grouping (the calibration profile: the folder carries the bundled model's
calibration.txt, and `uncompctl calibrate` runs before the first timed setting that needs it)
and with grouping=prompt (entropies of each request's own prompt at every layer end).

Floor model, per setting: prefill = total prompt tokens / bench_gpu's single-sequence prefill
rate at that length; decode = ceil(requests / B) waves x max_tokens steps x bench_gpu's step
time at batch B and the mean context of a decode (kept prompt tokens + max_tokens / 2), where
B = min(clients, max batch, sequences the pool holds at kept prompt + max_tokens tokens each);
the B sequences are prompts of their own (--decode-distinct), as served: forks of one prompt
share its blocks, whose K/V reads then hit L2 (32 x 8K: 11.6 ms a step against 13.9).
The two are added: one GPU does both, at the rates the engine reaches alone. (A step that mixes
decode rows into a prefill slice can beat the sum a little, so this is a floor of the engine's
own rates, not a hard bound.)

Targets (issue 11), each printed as PASS/FAIL with its numbers:
  b: full total tok/s >= 0.8 x the 8K prefill rate; full ITL p99 <= 4 x single-stream ITL
     (ITL p50 of workload a when run, else bench_gpu's batch-1 step)
  c: uncomp req/s >= 2.0 x full; uncomp >= snapkv (and within 5% of it, item 4); uncomp
     within 1.3 x of its floor; each for both groupings
  d: full >= 6500 output tok/s
  b, c, d: uncomp output tok/s never below full
Daemon flags go through --daemon-args in its '=' form when they start with '--', e.g.
--daemon-args=--schedule=prefill-first (prefill-only steps while prompts prefill; README,
"Scheduling") or --daemon-args="--schedule prefill-first --max-decode-wait-ms 200"; they are
recorded in the JSON (daemon_args).
On a GPU, nvidia-smi samples the clocks, power and temperature all along (tests/bench/gpu_monitor.py,
raw samples in $OUT/gpu-monitor.txt), and bench_gpu's run and each workload are followed by a
`gpu` line: the SM clock's median and spread, power, and the limits (power cap, heat) the
driver reported, so a sustained load can be compared with the short benchmark behind its floor.
With --step-trace the daemon writes a JSON line per engine step (uncompd --step-trace) and each
workload's table is followed by tests/bench/step_trace.py's summary of its steps (where the wall
time went, decode step times by batch, the prefill rate of prefill-only steps), and by
tests/bench/token_times.py's of the client's inter-token gaps (`uncompctl bench --token-times`:
which gaps are streams' first ones, and whether the late tokens came in moments of most streams
at once or one stream at a time; with the daemon's send trace, uncompd --send-trace, whether a
moment's tokens left the scheduler late, waited in the daemon before gRPC, or were late after
it, and whether the client's stall probe saw the host busy); the traces and token times go to
$OUT/traces-<workloads>.tar, each gzipped, smallest first while it stays within 12 MiB (what
comes back from a device is a few files of at most 16 MiB).
Everything printed also goes to $OUT/serve.log when OUT is set (and --log FILE); the numbers to
$OUT/serve-<workloads>.json (--tag T: serve-<workloads>T.json, serveT.log and
traces-<workloads>T.tar, for two runs in one call). With --budget-s the run ends in time:
requests are sent for a share of the time left (the table's `done` column then shows fewer than
asked; floors count those), and a SIGTERM (device_check.sh's `timeout`) still prints the targets
of the workloads done.
"""
import argparse
import gzip
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import step_trace  # noqa: E402
from e2e_util import free_port  # noqa: E402 (below the ephemeral range, as the e2e suites)
import token_times  # noqa: E402
from gpu_monitor import GpuMonitor  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
GIB = 1 << 30
TRACE_COPY_MAX = 12 << 20  # the traces' archive in $OUT stays within this (gzipped)

SHAPES = {
    # Llama-3.1-8B's shape and RoPE, with the bundled tokenizer's 4096-token vocabulary
    "llama8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                    vocab=4096, rope_theta=500000.0, max_pos=131072, orig_max_pos=8192),
    # the 8B's layer shapes, RoPE and names in two layers: checks on a CPU that the daemon takes
    # the folder (runs the tiny workloads)
    "llama8b-l2": dict(hidden=4096, layers=2, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                       vocab=4096, rope_theta=500000.0, max_pos=131072, orig_max_pos=8192),
    # the 8B's 32 layers and 32/8 heads at head size 8: the host's work per decode step (index
    # arrays, block tables over 8 KV heads x 32 layers a sequence) measured on a CPU
    # (bench_gpu --backend cpu --decode-at 256:1024 prints its median)
    "llama8b-heads": dict(hidden=256, layers=32, heads=32, kv_heads=8, head_dim=8, ffn=512,
                          vocab=4096, rope_theta=500000.0, max_pos=16384, orig_max_pos=8192),
    # a CPU dry run of the plumbing
    "tiny": dict(hidden=256, layers=2, heads=8, kv_heads=4, head_dim=32, ffn=768, vocab=4096,
                 rope_theta=500000.0, max_pos=16384, orig_max_pos=8192),
}

# name: daemon (pool, max batch), load (requests, clients, prompt tokens, max tokens), settings
WORKLOADS = {
    "llama8b": {
        "a": dict(pool="80GiB", batch=128, n=8, c=1, prompt=512, out=256, warmup=1,
                  settings=["policy=full"]),
        "b": dict(pool="80GiB", batch=128, n=64, c=32, prompt=8192, out=128, warmup=0,
                  settings=["policy=full", "policy=uncomp,kv_budget=819,grouping=prompt"]),
        "c": dict(pool="8GiB", batch=128, n=64, c=64, prompt=4096, out=1024, warmup=0,
                  settings=["policy=full", "policy=uncomp,kv_budget=410,grouping=prompt",
                            "policy=uncomp,kv_budget=410", "policy=snapkv,kv_budget=410"]),
        "d": dict(pool="100GiB", batch=256, n=256, c=256, prompt=1024, out=512, warmup=0,
                  settings=["policy=full", "policy=uncomp,kv_budget=128,grouping=prompt",
                            "policy=uncomp,kv_budget=128", "policy=snapkv,kv_budget=128"]),
        # a few chats at once: decode batches of 8 and less, where the products' kernel for
        # 1-8 rows decides the step
        "e": dict(pool="80GiB", batch=128, n=32, c=8, prompt=512, out=256, warmup=1,
                  settings=["policy=full"]),
    },
    "tiny": {  # also llama8b-l2
        "a": dict(pool="64MiB", batch=32, n=2, c=1, prompt=64, out=16, warmup=1,
                  settings=["policy=full"]),
        "b": dict(pool="64MiB", batch=32, n=8, c=4, prompt=256, out=8, warmup=0,
                  settings=["policy=full", "policy=uncomp,kv_budget=32,grouping=prompt"]),
        "c": dict(pool="1MiB", batch=32, n=8, c=8, prompt=128, out=32, warmup=0,
                  settings=["policy=full", "policy=uncomp,kv_budget=16,grouping=prompt",
                            "policy=uncomp,kv_budget=16", "policy=snapkv,kv_budget=16"]),
        "d": dict(pool="64MiB", batch=64, n=16, c=16, prompt=64, out=16, warmup=0,
                  settings=["policy=full", "policy=uncomp,kv_budget=16,grouping=prompt",
                            "policy=uncomp,kv_budget=16", "policy=snapkv,kv_budget=16"]),
        "e": dict(pool="64MiB", batch=32, n=8, c=4, prompt=64, out=16, warmup=1,
                  settings=["policy=full"]),
    },
}
BLOCK_TOKENS = 16  # the daemon's default --kv-block-tokens


class Log:
    """print() to stdout and to every log file."""

    def __init__(self, paths):
        self.files = []
        for p in paths:
            try:
                self.files.append(open(p, "a"))
            except OSError as e:
                print("cannot write %s: %s" % (p, e))

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        for f in self.files:
            f.write(s + "\n")
            f.flush()


def parse_bytes(s):
    m = re.match(r"^(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|TiB)?$", s)
    if not m:
        raise ValueError("size %r" % s)
    mult = {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": GIB, "TiB": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


# ---- the model folder -------------------------------------------------------------------------

def tensor_list(sh):
    """(name, shape, is_norm) in the order HF writes them."""
    C, F, V = sh["hidden"], sh["ffn"], sh["vocab"]
    q, kv = sh["heads"] * sh["head_dim"], sh["kv_heads"] * sh["head_dim"]
    out = [("model.embed_tokens.weight", (V, C), False)]
    for l in range(sh["layers"]):
        p = "model.layers.%d." % l
        out += [(p + "input_layernorm.weight", (C,), True),
                (p + "self_attn.q_proj.weight", (q, C), False),
                (p + "self_attn.k_proj.weight", (kv, C), False),
                (p + "self_attn.v_proj.weight", (kv, C), False),
                (p + "self_attn.o_proj.weight", (C, q), False),
                (p + "post_attention_layernorm.weight", (C,), True),
                (p + "mlp.gate_proj.weight", (F, C), False),
                (p + "mlp.up_proj.weight", (F, C), False),
                (p + "mlp.down_proj.weight", (C, F), False)]
    out += [("model.norm.weight", (C,), True), ("lm_head.weight", (V, C), False)]
    return out


def config_json(sh):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None,
        "hidden_act": "silu", "hidden_size": sh["hidden"], "intermediate_size": sh["ffn"],
        "num_hidden_layers": sh["layers"], "num_attention_heads": sh["heads"],
        "num_key_value_heads": sh["kv_heads"], "head_dim": sh["head_dim"],
        "max_position_embeddings": sh["max_pos"], "rms_norm_eps": 1e-5,
        "rope_theta": sh["rope_theta"],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": sh["orig_max_pos"]},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": sh["vocab"],
        "initializer_range": 0.02, "use_cache": True,
    }


def write_model(d, shape_name, log, shard_gib=4.6):
    import numpy as np
    sh = SHAPES[shape_name]
    marker = os.path.join(d, ".uncomp_shape")
    want = json.dumps({"shape": shape_name, **sh}, sort_keys=True)
    calib = os.path.join(REPO, "models", "uncomp-tiny", "calibration.txt")
    if os.path.exists(marker) and open(marker).read() == want:
        log("model: reusing %s (%s)" % (d, shape_name))
        shutil.copy(calib, d)  # also into a folder written before it was part of one
        return
    t0 = time.time()
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    # one block of random bf16 (round to nearest even from float32), std 0.02; its length is
    # prime, so rows taken from it at any offset never repeat within a tensor
    n_block = 4194301
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal(n_block, dtype=np.float32) * np.float32(0.02)).view(np.uint32)
    block = ((x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >>
             np.uint32(16)).astype(np.uint16)
    block2 = np.concatenate([block, block])  # any window of n_block values is contiguous
    ones = np.full(sh["hidden"], 0x3F80, dtype=np.uint16)  # bf16 1.0
    tensors = tensor_list(sh)
    # shards of at most ~4.6 GiB, like HF's 5 GB default
    shards, cur, cur_bytes = [], [], 0
    for t in tensors:
        nb = 2 * math.prod(t[1])
        if cur and cur_bytes + nb > shard_gib * GIB:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for si, shard in enumerate(shards):
        fname = "model-%05d-of-%05d.safetensors" % (si + 1, len(shards))
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            nb = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(os.path.join(d, fname), "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for ti, (name, shape, is_norm) in enumerate(shard):
                n = math.prod(shape)
                if is_norm:
                    f.write(ones[:n].tobytes())
                    continue
                start = zlib.crc32(name.encode()) % n_block
                while n > 0:  # windows of the doubled block, each a new offset
                    k = min(n, n_block)
                    f.write(memoryview(block2[start:start + k]))
                    n -= k
                    start = (start + 7919) % n_block
        total += off
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config_json(sh), f, indent=1)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(REPO, "models", "uncomp-tiny", fn), d)
    # the text the daemon calibrates on (the same tokenizer's): uncomp's default grouping
    shutil.copy(calib, d)
    with open(marker, "w") as f:
        f.write(want)
    log("model: wrote %s (%s, %.2f GiB in %d shards) in %.1f s" %
        (d, shape_name, total / GIB, len(shards), time.time() - t0))


def default_model_dir(shape):
    """/dev/shm when it has room (no disk write-back: 14 GiB took 47 s to a 2-core VM's disk),
    else /tmp. An existing folder of either is reused."""
    name = "uncomp-%s-shape" % shape
    sh = SHAPES[shape]
    need = 2.5 * sh["layers"] * sh["hidden"] * (sh["hidden"] + 3 * sh["ffn"]) + (1 << 30)
    for base in ("/dev/shm", "/tmp"):
        if os.path.exists(os.path.join(base, name, ".uncomp_shape")):
            return os.path.join(base, name)
    try:
        if shutil.disk_usage("/dev/shm").free > need:
            return os.path.join("/dev/shm", name)
    except OSError:
        pass
    return os.path.join("/tmp", name)


# ---- engine floor (bench_gpu) -----------------------------------------------------------------

def kv_bytes_per_token(sh):
    # K and V; bf16 on the GPU, float32 on the CPU backend
    return sh["layers"] * sh["kv_heads"] * sh["head_dim"] * 2 * sh["kv_elem_bytes"]


def setting_budget(setting, prompt):
    """Prompt tokens a setting keeps per head (its kv_budget, or the whole prompt)."""
    kv = dict(x.split("=", 1) for x in setting.split(","))
    if kv.get("policy", "full") == "full":
        return prompt
    return min(prompt, int(kv.get("kv_budget", "128")))


def blocks(tokens):
    return -(-tokens // BLOCK_TOKENS)


def seq_bytes(sh, kept, out):
    """A sequence's KV bytes: its kept prompt and its output, in whole blocks."""
    return (blocks(kept) + blocks(out)) * BLOCK_TOKENS * kv_bytes_per_token(sh)


def decode_batch(sh, w, setting):
    """Sequences decoded together: clients, max batch and what the pool holds (kept prompt +
    max_tokens per sequence, whole blocks)."""
    kept = setting_budget(setting, w["prompt"])
    fit = parse_bytes(w["pool"]) // seq_bytes(sh, kept, w["out"])
    return max(1, min(w["c"], w["batch"], fit)), fit, kept


def gpu_memory_bytes():
    """The first GPU's memory as nvidia-smi reports it, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return int(out.split()[0]) << 20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def folder_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.endswith(".safetensors"))


# what a card keeps beside the weights and the pool: workspaces of 8192-row slices, cuBLAS,
# the CUDA context, prefill buffers
CARD_ROOM = 12 * GIB


def fit_pools(wls, sh, card, weights, log):
    """Workloads whose pool cannot sit beside the weights on this card (an 80 GB H100 holds
    neither b's 80 GiB nor d's 100 GiB) get the pool their running sequences need in full
    (min(clients, max batch) x whole prompt and output), rounded up to GiB, if that fits: the
    same decode batches, so the same floors. Others keep theirs (the daemon names a pool that
    does not fit)."""
    room = card - weights - CARD_ROOM
    out = {}
    for n, w in wls.items():
        if parse_bytes(w["pool"]) <= room:
            out[n] = w
            continue
        need = -(-min(w["c"], w["batch"]) * seq_bytes(sh, w["prompt"], w["out"]) // GIB)
        if need > room // GIB:
            out[n] = w
            continue
        log("pool %s: %s -> %dGiB (this card's %.0f GiB less %.1f GiB of weights and %d GiB of "
            "room cannot hold %s; %d running sequences need %d GiB)" %
            (n, w["pool"], need, card / GIB, weights / GIB, CARD_ROOM // GIB, w["pool"],
             min(w["c"], w["batch"]), need))
        out[n] = dict(w, pool="%dGiB" % need)
    return out


def decode_ctx(w, kept):
    return kept + w["out"] // 2


def run_bench_gpu(args, sh, wls, log):
    lengths = sorted({w["prompt"] for w in wls.values()} | ({8192} if args.shape == "llama8b"
                                                          else set()), reverse=True)
    pairs = set()
    for w in wls.values():
        for s in w["settings"]:
            b, _, kept = decode_batch(sh, w, s)
            pairs.add((b, decode_ctx(w, kept)))
    pairs = sorted(pairs)
    need = max(b * (c + 40) for b, c in pairs) * kv_bytes_per_token(sh)
    kv_gib = max(1.0, math.ceil(need * 1.1 / GIB))
    cmd = [os.path.join(args.build, "tests", "bench", "bench_gpu"), "--model", args.model_dir,
           "--backend", args.backend, "--kv-mem-gib", str(kv_gib), "--reps", str(args.reps),
           "--decode-steps", "16", "--max-batch", str(max(b for b, _ in pairs)),
           "--prefill", ",".join(str(n) for n in lengths),
           "--decode-at", ",".join("%d:%d" % p for p in pairs), "--decode-distinct",
           "--skip-compress"]
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=args.bench_gpu_timeout)
    for line in p.stdout.splitlines():
        log("  " + line)
    log("bench_gpu: exit %d in %.1f s" % (p.returncode, time.time() - t0))
    eng = {"prefill": {}, "step_ms": {}, "b1_ms": None}
    for line in p.stdout.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if m:
            eng["prefill"][int(m.group(1))] = float(m.group(2))
        m = re.match(r"^decode batch=(\d+) context=(\d+)(?: distinct)?: step ([\d.]+) ms", line)
        if m:
            eng["step_ms"][(int(m.group(1)), int(m.group(2)))] = float(m.group(3))
        m = re.match(r"^decode batch=1 \(context \d+\): step ([\d.]+) ms", line)
        if m:
            eng["b1_ms"] = float(m.group(1))
    if p.returncode != 0:
        log("bench_gpu failed: no floors")
    return eng


def floor_s(sh, eng, w, setting):
    """(floor seconds, its parts) or (None, why)."""
    rate = eng["prefill"].get(w["prompt"])
    b, fit, kept = decode_batch(sh, w, setting)
    step = eng["step_ms"].get((b, decode_ctx(w, kept)))
    if not rate or step is None:
        return None, "no engine number"
    pre = w["n"] * w["prompt"] / rate
    waves = -(-w["n"] // b)
    dec = waves * w["out"] * step / 1e3
    why = "prefill %.1f s + %d waves x %d steps x %.2f ms at batch %d (pool fits %d)" % (
        pre, waves, w["out"], step, b, fit)
    return pre + dec, why


# ---- the daemon -------------------------------------------------------------------------------

def needs_profile(w):
    """Whether a setting of w uses uncomp's entropy groups from the calibration profile."""
    return any(x.split(",")[0] in ("policy=uncomp", "policy=uncomp-stage") and
               "grouping=prompt" not in x for x in w["settings"])


class Daemon:
    def __init__(self, args, pool, batch, log):
        self.addr = "127.0.0.1:%d" % free_port()
        self.log_path = os.path.join(args.tmp, "uncompd-%s-%d.log" % (pool, batch))
        self.args = args
        self.cmd = [os.path.join(args.build, "daemon", "uncompd"), "--model", args.model_dir,
                    "--backend", args.backend, "--kv-memory", pool, "--max-batch", str(batch),
                    "--max-running", str(batch), "--listen", self.addr,
                    "--profile", os.path.join(args.tmp, "profile.json")]
        self.trace = self.sends = None
        if args.step_trace:
            self.trace = os.path.join(args.tmp, "steps-%s-%d.jsonl" % (pool, batch))
            self.sends = os.path.join(args.tmp, "sends-%s-%d.jsonl" % (pool, batch))
            self.cmd += ["--step-trace", self.trace, "--send-trace", self.sends]
        self.cmd += shlex.split(args.daemon_args) + args.daemon_arg
        log("$ " + " ".join(shlex.quote(c) for c in self.cmd))
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def trace_lines(self):
        """Lines of the step trace so far (0 without one)."""
        if not self.trace or not os.path.exists(self.trace):
            return 0
        with open(self.trace, "rb") as f:
            return sum(1 for _ in f)

    def tail(self, n=25):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def ctl(self, *a, timeout=60):
        return subprocess.run([os.path.join(self.args.build, "client", "uncompctl"), "--server",
                               self.addr] + [str(x) for x in a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)

    def wait_serving(self, timeout):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("uncompd exited with %s during start-up:\n%s" %
                                   (self.proc.returncode, self.tail()))
            r = self.ctl("-w", "--connect-timeout-ms", "2000", "health", "--wait-ms", "2000",
                         timeout=30)
            if r.returncode == 0 and "SERVING" in r.stdout:
                return time.time() - t0
            time.sleep(0.2)
        raise RuntimeError("uncompd not SERVING after %d s:\n%s" % (timeout, self.tail()))

    def stop(self, log):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                log("uncompd did not exit 60 s after SIGTERM: killed\n" + self.tail())
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.logf.close()
        return self.proc.returncode


def pack_traces(tmp, path, log):
    """The step and send traces and the token times of the run, each gzipped once, smallest
    first, into one tar while it stays within TRACE_COPY_MAX (the rest is named in the log: its
    summary is there)."""
    files = sorted((os.path.getsize(os.path.join(tmp, f)), f) for f in os.listdir(tmp)
                   if f.startswith(("steps-", "sends-", "tokens-")))
    if not files:
        return
    total, left = 0, []
    with tarfile.open(path, "w") as tar:
        for _, f in files:
            with open(os.path.join(tmp, f), "rb") as fh:
                z = gzip.compress(fh.read(), 6)
            if total + len(z) > TRACE_COPY_MAX:
                left.append("%s (%.1f MiB gzipped)" % (f, len(z) / 2**20))
                continue
            info = tarfile.TarInfo(f + ".gz")
            info.size, info.mtime = len(z), int(time.time())
            tar.addfile(info, io.BytesIO(z))
            total += len(z)
    if left:
        log("traces not packed into %s, to stay within %d MiB: %s" % (
            os.path.basename(path), TRACE_COPY_MAX >> 20, ", ".join(left)))


# ---- the run ----------------------------------------------------------------------------------

def bench(d, w, seed, timeout, duration_s=None, times=None, extra=()):
    a = ["bench", "--json", "--no-progress", "-c", w["c"], "-n", w["n"], "-m", w["out"],
         "--prompt-tokens", w["prompt"], "--seed", seed, "--warmup", w["warmup"]] + list(extra)
    if times:  # every chunk's arrival (token_times.py)
        a += ["--token-times", times]
    if duration_s:  # no new request after this many seconds (those in flight finish)
        a += ["--duration", "%.0f" % duration_s]
    if len(w["settings"]) > 1:
        a += ["--compare"] + w["settings"]
    else:
        kv = dict(x.split("=", 1) for x in w["settings"][0].split(","))
        for k, v in kv.items():
            a += ["--" + k.replace("_", "-"), v]
    r = d.ctl(*a, timeout=timeout)
    try:  # exit 1 (every request of a setting failed) still reports every setting
        return json.loads(r.stdout)
    except ValueError:
        raise RuntimeError("uncompctl bench exit %d:\n%s\n%s" % (r.returncode, r.stdout[-2000:],
                                                                 r.stderr[-2000:]))


def single_stream_itl(results, eng):
    """b's ITL bound is 4 x this: (ms, where from): workload a's ITL p50 when it ran, else
    --single-itl, else bench_gpu's batch-1 step, else (None, None)."""
    for r in (results.get("a") or {}).get("runs", []):
        if r["setting"] == "policy=full" and r["completed"]:
            return r["itl_ms"]["p50"], "workload a p50"
    if eng.get("single_itl"):
        return eng["single_itl"], "--single-itl"
    return (eng["b1_ms"], "bench_gpu batch 1") if eng["b1_ms"] else (None, None)


class OutOfTime(Exception):
    pass


def fmt(x, f="%.1f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f % x


def pool_overrides(specs, table):
    """--pool W=SIZE options as {workload: size}; ValueError names a bad one."""
    pools = {}
    for spec in specs:
        n, _, size = spec.partition("=")
        try:
            ok = n in table and parse_bytes(size) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("--pool %r: expected W=SIZE with W one of %s and SIZE like 48GiB" %
                             (spec, sorted(table)))
        pools[n] = size
    return pools


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--workloads", default="all", help="all, or names joined by commas: a,b,c,d,e")
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--model-dir", default=None,
                    help="default /dev/shm/uncomp-<shape>-shape when it has room, else /tmp/...")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--daemon-args", action="append", default=[],
                    help="more uncompd flags (the daemon's own defaults suit the GPU: 8192-row "
                    "products, 65536 row-layers of prefill per step); write "
                    "--daemon-args=--schedule=prefill-first, with '=', for flags; given "
                    "twice, both count")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="one more uncompd argument (repeatable; for flags written with '=', "
                    "e.g. --daemon-arg=--prefill-chunk=16384, where --daemon-args would need "
                    "quoting)")
    ap.add_argument("--bench-arg", action="append", default=[],
                    help="one more uncompctl bench argument (repeatable), e.g. "
                    "--bench-arg=--connections=32 (the clients on connections of their own "
                    "instead of gRPC's one shared connection)")
    ap.add_argument("--only", default="",
                    help="run only these settings, joined by ';' (e.g. policy=full)")
    ap.add_argument("--settings", default="",
                    help="replace the workloads' settings by these, joined by ';' (e.g. "
                    "'policy=snapkv,kv_budget=410;policy=snapkv+think,kv_budget=410')")
    ap.add_argument("--reps", type=int, default=2, help="bench_gpu repetitions")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start-timeout", type=int, default=240)
    ap.add_argument("--bench-timeout", type=int, default=400)
    ap.add_argument("--bench-gpu-timeout", type=int, default=240)
    ap.add_argument("--no-bench-gpu", action="store_true", help="skip the floors")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="finish within this many seconds (0: no limit): a workload that cannot "
                    "start is skipped, and each setting sends requests for its share of what is "
                    "left (bench --duration), so a slow run reports fewer requests, not nothing")
    ap.add_argument("--step-trace", action="store_true",
                    help="the daemon traces its steps; each workload ends with their summary")
    ap.add_argument("--shard-gib", type=float, default=4.6, help="safetensors shard size")
    ap.add_argument("--write-only", action="store_true", help="write the model folder and stop")
    ap.add_argument("--log", action="append", default=[])
    ap.add_argument("--single-itl", type=float, default=None,
                    help="the single-stream ITL (ms) of b's bound when workload a does not run "
                    "(default: bench_gpu's batch-1 step; e.g. a second run of b in one call)")
    ap.add_argument("--tag", default="",
                    help="appended to the names of the files in $OUT (two runs in one call)")
    ap.add_argument("--pool", action="append", default=[], metavar="W=SIZE",
                    help="workload W's KV pool instead of its own or the one fitted to the card "
                    "(e.g. b=48GiB)")
    args = ap.parse_args()
    args.daemon_args = " ".join(args.daemon_args)  # every --daemon-args given, in order
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
    logs = list(args.log) + ([os.path.join(out, "serve%s.log" % args.tag)] if out else [])
    log = Log(logs)
    args.build = os.path.abspath(args.build)
    args.model_dir = args.model_dir or default_model_dir(args.shape)
    table = WORKLOADS["llama8b" if args.shape == "llama8b" else "tiny"]
    names = sorted(table) if args.workloads == "all" else \
        [x for x in args.workloads.split(",") if x]
    bad = [x for x in names if x not in table]
    if bad:
        log("unknown workload(s) %s; have %s" % (bad, sorted(table)))
        return 2
    try:
        pools = pool_overrides(args.pool, table)
    except ValueError as e:
        log(str(e))
        return 2
    if args.write_only:
        write_model(args.model_dir, args.shape, log, args.shard_gib)
        return 0
    for exe in ("daemon/uncompd", "client/uncompctl", "tests/bench/bench_gpu"):
        if not os.access(os.path.join(args.build, exe), os.X_OK):
            log("missing %s in %s" % (exe, args.build))
            return 2
    sh = dict(SHAPES[args.shape], kv_elem_bytes=4 if args.backend == "cpu" else 2)
    wls = {n: table[n] for n in names}
    for n, size in pools.items():
        if n in wls:
            wls[n] = dict(wls[n], pool=size)
    if args.settings:
        wls = {n: dict(w, settings=args.settings.split(";")) for n, w in wls.items()}
    if args.only:
        keep = args.only.split(";")
        wls = {n: dict(w, settings=[x for x in w["settings"] if x in keep]) for n, w in wls.items()}
        wls = {n: w for n, w in wls.items() if w["settings"]}
        names = [n for n in names if n in wls]
    args.tmp = tempfile.mkdtemp(prefix="uncomp_serve_")
    t_all = time.time()
    log("# serve_gpu: shape %s, backend %s, workloads %s, daemon args %r" %
        (args.shape, args.backend, ",".join(names),
         " ".join([args.daemon_args] + args.daemon_arg).strip()))
    write_model(args.model_dir, args.shape, log, args.shard_gib)
    card = gpu_memory_bytes() if args.backend == "cuda" else None
    if card:
        fitted = fit_pools({n: w for n, w in wls.items() if n not in pools}, sh, card,
                           folder_bytes(args.model_dir), log)
        wls = {n: fitted.get(n, w) for n, w in wls.items()}
    eng = {"prefill": {}, "step_ms": {}, "b1_ms": None}
    mon = GpuMonitor(os.path.join(out or args.tmp, "gpu-monitor.txt")) \
        if args.backend == "cuda" else None
    if not args.no_bench_gpu:
        t_eng = time.time()
        try:
            if args.budget_s:
                args.bench_gpu_timeout = min(args.bench_gpu_timeout,
                                             max(30, args.budget_s - (time.time() - t_all) - 120))
            eng = run_bench_gpu(args, sh, wls, log)
        except subprocess.TimeoutExpired:
            log("bench_gpu timed out after %d s: no floors" % args.bench_gpu_timeout)
        if mon:
            log("bench_gpu's " + mon.summary(t_eng, time.time()))
    eng["single_itl"] = args.single_itl
    results, rc = {}, 0
    d, d_key = None, None

    def out_of_time(signum, frame):  # `timeout` ran out: report what finished, not nothing
        raise OutOfTime()
    signal.signal(signal.SIGTERM, out_of_time)
    name = None
    try:
        for name in names:
            w = wls[name]
            t0 = time.time()
            left = args.budget_s - (t0 - t_all) if args.budget_s else None
            if left is not None and left < 45:
                log("\n## workload %s SKIPPED: %.0f s left of --budget-s %.0f" %
                    (name, left, args.budget_s))
                results[name] = None
                continue
            log("\n## workload %s: %d x %d-token prompts, %d out, %d clients, pool %s, "
                "batch %d: %s" % (name, w["n"], w["prompt"], w["out"], w["c"], w["pool"],
                                  w["batch"], " vs ".join(w["settings"])))
            try:
                if d_key != (w["pool"], w["batch"]):
                    if d is not None:
                        log("uncompd stopped: exit %s" % d.stop(log))
                        d = None
                    d = Daemon(args, w["pool"], w["batch"], log)
                    d_key = (w["pool"], w["batch"])
                    log("uncompd SERVING after %.1f s" % d.wait_serving(args.start_timeout))
                    # first requests pay for lazy set-up (cuBLAS handles, workspaces)
                    r = d.ctl("bench", "--no-progress", "-c", "2", "-n", "2", "-m", "4",
                              "--prompt-tokens", min(512, w["prompt"]), timeout=120)
                    log("warm-up: exit %d" % r.returncode)
                if needs_profile(w) and not os.path.exists(os.path.join(args.tmp,
                                                                         "profile.json")):
                    # uncomp's default (profile) grouping: calibrate before the clock starts,
                    # as a deployment would (else the first request starts it in the background)
                    t_cal = time.time()
                    r = d.ctl("calibrate", "--window-tokens", min(1024, w["prompt"]),
                              timeout=900)
                    log("calibration (the model folder's calibration.txt): exit %d in %.1f s%s" %
                        (r.returncode, time.time() - t_cal,
                         "" if r.returncode == 0 else ": " + (r.stderr or r.stdout)[-400:]))
                cap, timeout = None, args.bench_timeout
                if args.budget_s:
                    left = args.budget_s - (time.time() - t_all)
                    cap = max(5.0, 0.7 * (left - 15) / len(w["settings"]))
                    timeout = max(10, min(timeout, left - 5))
                    log("time budget: %.0f s left; each setting sends requests for at most "
                        "%.0f s" % (left, cap))
                trace_from = d.trace_lines()
                t_bench = time.time()
                times = os.path.join(args.tmp, "tokens-%s.txt" % name) if d.trace else None
                j = bench(d, w, args.seed, timeout, cap, times, args.bench_arg)
                if mon:
                    log("workload %s's %s" % (name, mon.summary(t_bench, time.time())))
                # the daemon's own view: inter-token gaps as the scheduler emitted the tokens
                # (its last 10,000, every setting so far), beside what the client received
                r = d.ctl("info", "requests", timeout=30)
                lat = dict(x.split(":", 1) for x in r.stdout.split() if x.startswith(
                    ("inter_token_ms_", "inter_token_count", "send_lag_ms_")) and ":" in x)
                if lat:
                    log("daemon-side inter-token gaps (last 10,000 of %s): p50 %s, p90 %s, "
                        "p99 %s ms" % (lat.get("inter_token_count"), lat.get("inter_token_ms_p50"),
                                       lat.get("inter_token_ms_p90"), lat.get("inter_token_ms_p99")))
                    # a token's emission to gRPC taking its chunk: a late send here is the
                    # daemon's; one only the client saw happened after it
                    log("daemon-side send lag (same samples): p50 %s, p99 %s, max %s ms" % (
                        lat.get("send_lag_ms_p50"), lat.get("send_lag_ms_p99"),
                        lat.get("send_lag_ms_max")))
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                log("workload %s FAILED: %s" % (name, e))
                if d is not None:
                    log("daemon log tail:\n" + d.tail())
                rc = 1
                results[name] = None
                if d is not None and d.proc.poll() is not None:
                    d = None
                    d_key = None
                continue
            results[name] = j
            log("%-44s %7s %7s %9s %9s %8s %8s %7s %7s %7s %7s %6s %6s" % (
                "setting", "done", "req/s", "out tok/s", "tot tok/s", "TTFT50", "TTFT99", "ITL50",
                "ITL99", "wall s", "floor", "x flr", "kept"))
            for run in j["runs"]:
                # the floor of the requests that completed (all of them unless cut by time)
                fl, why = floor_s(sh, eng, dict(w, n=run["completed"] or w["n"]),
                                  run["setting"])
                run["floor_s"] = fl
                run["floor_model"] = why
                run["x_floor"] = run["duration_s"] / fl if fl else None
                log("%-44s %7s %7s %9s %9s %8s %8s %7s %7s %7s %7s %6s %6s%s" % (
                    run["setting"], "%d/%d" % (run["completed"], w["n"]),
                    fmt(run["requests_per_s"], "%.3f"),
                    fmt(run["output_tokens_per_s"], "%.0f"), fmt(run["total_tokens_per_s"], "%.0f"),
                    fmt(run["ttft_ms"]["p50"], "%.0f"), fmt(run["ttft_ms"]["p99"], "%.0f"),
                    fmt(run["itl_ms"]["p50"], "%.2f"), fmt(run["itl_ms"]["p99"], "%.2f"),
                    fmt(run["duration_s"]), fmt(fl), fmt(run["x_floor"], "%.2f"),
                    fmt(run["kv_kept_ratio"], "%.3f"),
                    "" if not run["failed"] else "  FAILED %d %s" % (run["failed"],
                                                                    run["errors"])))
                log("    floor: %s" % why)
                if run["failed"]:
                    rc = 1
            if d.trace:
                log("step trace of workload %s (every setting, in order):" % name)
                log("\n".join(step_trace.summary(step_trace.load(d.trace, trace_from),
                                                 sh["layers"])))
                # the client's gaps beside it: over b's target bound when workload a ran
                single = single_stream_itl(results, eng)[0]
                if times and os.path.exists(times):
                    log("client-side gaps of workload %s (uncompctl bench --token-times):" % name)
                    log("\n".join(token_times.summary(times, 4 * single if single else None,
                                                       send_trace=d.sends,
                                                       step_trace=d.trace)))
            log("workload %s: wall %.1f s" % (name, time.time() - t0))
    except OutOfTime:
        log("\nSIGTERM (out of time) during workload %s: the targets below cover the workloads "
            "that finished" % name)
        if name:
            results.setdefault(name, None)
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if d is not None:
            log("uncompd stopped: exit %s" % d.stop(log))
        if mon:
            mon.stop()
    rc = max(rc, targets(results, eng, log, args.shape))
    log("\n# serve_gpu done in %.1f s" % (time.time() - t_all))
    if out:
        with open(os.path.join(out, "serve-%s%s.json" % ("".join(names), args.tag)), "w") as f:
            steps = {"%d:%d" % k: v for k, v in eng["step_ms"].items()}
            json.dump({"shape": args.shape, "backend": args.backend,
                       "daemon_args": shlex.split(args.daemon_args) + args.daemon_arg,
                       "workloads": wls,
                       "engine": {"prefill": eng["prefill"], "b1_ms": eng["b1_ms"],
                                  "step_ms": steps},
                       "results": results}, f, indent=1)
    if out:  # the traces in one archive: a few files of at most 16 MiB come back from a device
        tar = "traces-%s%s.tar" % ("".join(names), args.tag)
        pack_traces(args.tmp, os.path.join(out, tar), log)
    shutil.rmtree(args.tmp, ignore_errors=True)
    return rc


def ratio_shortfall(run, rate, w):
    """What b's run lacks for 0.8 of the burst prefill rate, in the two levers that can close it:
    its decode steps (waves x (out - 1) of them: the first token comes with the prefill) and its
    served prefill steps, a prompt each. None when it has the rate. (A prefill faster in the burst
    too raises the bound with it: ratio = (prompt + out) / prompt x burst / (prefill + decode /
    prompts), per prompt.)"""
    wall = run["duration_s"]
    need = run["total_tokens_per_s"] * wall / (0.8 * rate)
    if need >= wall or not run["completed"]:
        return None
    steps = -(-run["completed"] // w["c"]) * (w["out"] - 1)
    return ("short of 0.8 by %.3f s of its %.3f s: %d decode steps %.2f ms faster each, or %d "
            "served prefill steps %.2f ms faster each" % (wall - need, wall, steps,
                                                         (wall - need) * 1e3 / steps,
                                                         run["completed"],
                                                         (wall - need) * 1e3 / run["completed"]))


def targets(results, eng, log, shape):
    """The issue's targets; returns 0 (PASS or not run) - a FAIL is a finding, not an error."""
    log("\n# targets (issue 11)%s" % ("" if shape == "llama8b" else
                                     " -- tiny shape: the numbers are not meaningful"))

    told = set()

    def runs(name, policy):
        """The runs of `policy` in workload `name` that completed requests (a FAIL line for
        each that completed none)."""
        got = []
        for r in (results.get(name) or {}).get("runs", []):
            if r["setting"].split(",")[0] == "policy=" + policy:
                if r["completed"]:
                    got.append(r)
                elif (name, r["setting"]) not in told:
                    told.add((name, r["setting"]))
                    log("FAIL  %s: %s completed no request; its targets are not measured" %
                        (name, r["setting"]))
        return got

    def run(name, policy):
        got = runs(name, policy)
        return got[0] if got else None

    def line(ok, what):
        log("%s  %s" % ("PASS" if ok else "FAIL", what))

    def grouping(r):
        return "prompt grouping" if "grouping=prompt" in r["setting"] else "profile grouping"

    run("a", "full")  # a FAIL line when workload a completed nothing (its ITL is b's bound)
    bf = run("b", "full")
    if bf:
        rate = eng["prefill"].get(8192)
        if rate:
            line(bf["total_tokens_per_s"] >= 0.8 * rate, "b: full total %.0f tok/s >= 0.8 x 8K "
                 "prefill rate %.0f = %.0f" % (bf["total_tokens_per_s"], rate, 0.8 * rate))
            short = ratio_shortfall(bf, rate, WORKLOADS["llama8b" if shape == "llama8b"
                                                        else "tiny"]["b"])
            if short:
                log("      " + short)
        single, source = single_stream_itl(results, eng)
        if single:
            line(bf["itl_ms"]["p99"] <= 4 * single, "b: full ITL p99 %.2f ms <= 4 x single-stream "
                 "ITL %.2f ms (%s) = %.2f" % (bf["itl_ms"]["p99"], single, source, 4 * single))
    cf, cs = run("c", "full"), run("c", "snapkv")
    for cu in runs("c", "uncomp"):
        g = grouping(cu)
        if cf:
            line(cu["requests_per_s"] >= 2.0 * cf["requests_per_s"], "c: uncomp (%s) %.3f req/s "
                 ">= 2.0 x full %.3f = %.3f" % (g, cu["requests_per_s"], cf["requests_per_s"],
                                                2 * cf["requests_per_s"]))
        if cs:
            line(cu["requests_per_s"] >= cs["requests_per_s"], "c: uncomp (%s) %.3f req/s >= "
                 "snapkv %.3f (%.3fx)" % (g, cu["requests_per_s"], cs["requests_per_s"],
                                          cu["requests_per_s"] / cs["requests_per_s"]))
            line(cu["requests_per_s"] >= 0.95 * cs["requests_per_s"], "c: uncomp (%s) within 5%% "
                 "of snapkv: %.3f req/s >= 0.95 x %.3f = %.3f" % (
                     g, cu["requests_per_s"], cs["requests_per_s"], 0.95 * cs["requests_per_s"]))
        if cu.get("floor_s"):
            line(cu["duration_s"] <= 1.3 * cu["floor_s"], "c: uncomp (%s) %.1f s within 1.3 x its "
                 "floor %.1f s = %.1f (%.2fx)" % (g, cu["duration_s"], cu["floor_s"],
                                                  1.3 * cu["floor_s"], cu["x_floor"] or 0))
    df = run("d", "full")
    if df:
        line(df["output_tokens_per_s"] >= 6500, "d: full %.0f output tok/s >= 6500" %
             df["output_tokens_per_s"])
    for n in ("b", "c", "d"):
        f = run(n, "full")
        for u in runs(n, "uncomp") if f else []:
            line(u["output_tokens_per_s"] >= f["output_tokens_per_s"], "%s: uncomp (%s) %.0f "
                 "output tok/s never below full %.0f" % (n, grouping(u), u["output_tokens_per_s"],
                                                         f["output_tokens_per_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

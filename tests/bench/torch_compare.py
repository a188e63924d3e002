"""PyTorch + transformers on the same GPU and the same synthetic shape as bench_gpu: prefill and
decode tokens/s of a randomly initialised LlamaForCausalLM in bf16 (SDPA attention), medians over
repeated runs, printed in the same units as bench_gpu so the two can be read side by side.

Usage: python3 torch_compare.py [--shape llama3-8b] [--prefill 8192,32768] [--reps 3]
                                [--decode 64] [--context 512]
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=128256, tie_word_embeddings=False),
    "llama3-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      vocab_size=128256, tie_word_embeddings=True),
}


def sync():
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--prefill", default="8192,32768")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    a = ap.parse_args()
    cfg = LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      **SHAPES[a.shape])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    name = torch.cuda.get_device_name()
    import transformers
    print(f"# torch_compare shape={a.shape} device={name} torch={torch.__version__} "
          f"transformers={transformers.__version__} attn=sdpa dtype=bf16 reps={a.reps}")
    print(f"{'prompt':>8} {'prefill_tok/s':>14} {'prefill_ms':>12}")
    with torch.inference_mode():
        for n in [int(x) for x in a.prefill.split(",")]:
            ids = torch.randint(2, cfg.vocab_size, (1, n), device="cuda", generator=gen)
            times = []
            for r in range(a.reps + 1):
                sync()
                t0 = time.perf_counter()
                try:
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
                except TypeError:
                    model(input_ids=ids, use_cache=False, num_logits_to_keep=1)
                sync()
                if r:
                    times.append(time.perf_counter() - t0)
            p = statistics.median(times)
            print(f"{n:8d} {n / p:14.0f} {p * 1e3:12.1f}", flush=True)
            del ids
            torch.cuda.empty_cache()
        # decode at batch 1: greedy steps with the KV cache after a context-length prompt
        ids = torch.randint(2, cfg.vocab_size, (1, a.context), device="cuda", generator=gen)
        steps = []
        for r in range(a.reps + 1):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            sync()
            t_step = []
            for _ in range(a.decode):
                t0 = time.perf_counter()
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                sync()
                t_step.append(time.perf_counter() - t0)
            if r:
                steps.append(statistics.median(t_step))
        s = statistics.median(steps)
        print(f"decode batch=1 (context {a.context}): step {s * 1e3:.3f} ms ({1 / s:.1f} tok/s)")


if __name__ == "__main__":
    main()

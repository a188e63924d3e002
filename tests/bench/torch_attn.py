"""PyTorch's causal prefill attention on the same GPU and in the same conditions as
test_cuda_ops --bench-prefill's context cases: 32 query heads over 8 KV heads, head size 128,
bf16, Q/K/V of a given spread laid out as a layer's projections give them ([tokens, heads, 128]
seen as [1, heads, tokens, 128]), each call timed alone, medians of 16, alone and right after a
layer's gate and up product (tokens x 28672 x 4096). One line per SDPA backend that takes the
shape, and the backend PyTorch picks by itself ("default").

Usage: python3 torch_attn.py [--tokens 8192,32768] [--std 1.0,1.28]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, HKV, D = 32, 8, 128
BACKENDS = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def attention(q, k, v, backend):
    with torch.cuda.nvtx.range("torch_attn"):  # for a profiler: device_check.sh ncu-prefill
        return attention_call(q, k, v, backend)


def attention_call(q, k, v, backend):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(backend):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except RuntimeError:  # a backend without GQA: K/V repeated per query head, as HF does
            r = H // HKV
            return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1),
                                                  v.repeat_interleave(r, 1), is_causal=True)


def median_ms(fn, before=None, reps=16):
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--std", default="1.0,1.28")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# torch_attn device={torch.cuda.get_device_name()} torch={torch.__version__} "
          f"H={H} Hkv={HKV} D={D} causal bf16, medians of 16 calls each timed alone")
    with torch.inference_mode():
        for n in [int(x) for x in a.tokens.split(",")]:
            flop = 4.0 * H * D * n * (n + 1) / 2.0
            w = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
            product = lambda: torch.matmul(x, w.t())  # noqa: E731
            for std in [float(s) for s in a.std.split(",")]:
                qkv = torch.randn(n, (H + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16) * std
                q = qkv[:, :H * D].view(n, H, D).transpose(0, 1).unsqueeze(0)
                k = qkv[:, H * D:(H + HKV) * D].view(n, HKV, D).transpose(0, 1).unsqueeze(0)
                v = qkv[:, (H + HKV) * D:].view(n, HKV, D).transpose(0, 1).unsqueeze(0)
                for name, backend in BACKENDS:
                    try:
                        alone = median_ms(lambda: attention(q, k, v, backend))
                        after = median_ms(lambda: attention(q, k, v, backend), product)
                    except RuntimeError as e:
                        print(f"torch attn {name:9s} n={n} std {std}: not available "
                              f"({str(e).splitlines()[0][:80]})")
                        continue
                    print(f"torch attn {name:9s} n={n} std {std}: alone {alone:.3f} ms "
                          f"{flop / alone / 1e9:.1f} TFLOP/s, after the product {after:.3f} ms "
                          f"{flop / after / 1e9:.1f} TFLOP/s", flush=True)
                del qkv, q, k, v
            tm = median_ms(product)
            print(f"torch matmul T={n} N=28672 K=4096: {tm:.3f} ms "
                  f"{2.0 * n * 28672 * 4096 / tm / 1e9:.1f} TFLOP/s", flush=True)
            del w, x
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

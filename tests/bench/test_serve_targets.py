"""serve_gpu.py's verdicts on issue 11's targets, from made-up results: the lines a device run
prints are what later sessions read, so their arithmetic is checked here (no GPU needed)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_gpu  # noqa: E402


def run(setting, **kw):
    r = {"setting": setting, "completed": 64, "requests_per_s": 1.0, "output_tokens_per_s": 100.0,
         "total_tokens_per_s": 1000.0, "duration_s": 10.0, "itl_ms": {"p50": 5.0, "p99": 9.0}}
    r.update(kw)
    return r


def verdicts(results, eng):
    lines = []
    serve_gpu.targets(results, eng, lines.append, "llama8b")
    return lines


def main():
    fails = []

    def check(ok, what):
        if not ok:
            fails.append(what)

    # --pool W=SIZE: a known workload and a size the daemon reads; anything else refused
    table = serve_gpu.WORKLOADS["llama8b"]
    check(serve_gpu.pool_overrides(["b=48GiB", "d=60GiB"], table) == {"b": "48GiB", "d": "60GiB"},
          "pool overrides")
    for bad in ("x=3GiB", "b=3Gb", "b", "b="):
        try:
            serve_gpu.pool_overrides([bad], table)
            fails.append("--pool %s accepted" % bad)
        except ValueError:
            pass

    # pools fitted to the card: an 80 GiB H100 gets b and d cut to their running sequences' need,
    # c's 8 GiB (the point of c) kept; an H200 keeps every pool
    sh = dict(serve_gpu.SHAPES["llama8b"], kv_elem_bytes=2)
    weights = int(13.06 * serve_gpu.GIB)
    h100 = serve_gpu.fit_pools(table, sh, 80 * serve_gpu.GIB, weights, lambda x: None)
    check({n: h100[n]["pool"] for n in "bcd"} == {"b": "33GiB", "c": "8GiB", "d": "48GiB"},
          {n: w["pool"] for n, w in h100.items()})
    b_full = serve_gpu.decode_batch(sh, h100["b"], "policy=full")[0]
    check(b_full == 32, "b's decode batch in the fitted pool: %d" % b_full)
    h200 = serve_gpu.fit_pools(table, sh, 141 * serve_gpu.GIB, weights, lambda x: None)
    check(all(h200[n]["pool"] == table[n]["pool"] for n in table), "an H200's pools changed")

    eng = {"prefill": {8192: 40079.0}, "b1_ms": 4.43}
    # O1's b: 31,869 tok/s over 16.708 s against a 40,079 burst: 0.101 s short
    b = run("policy=full", total_tokens_per_s=31869.0, duration_s=16.708, itl_ms={"p50": 12.7,
                                                                                  "p99": 13.81})
    lines = verdicts({"b": {"runs": [b]}}, eng)
    check(any(x.startswith("FAIL  b: full total 31869 tok/s") for x in lines), lines)
    check(any(x.startswith("PASS  b: full ITL p99 13.81 ms") for x in lines), lines)
    short = [x for x in lines if "short of 0.8" in x]
    check(len(short) == 1 and "by 0.101 s of its 16.708 s" in short[0] and
          "254 decode steps 0.40 ms faster each" in short[0] and
          "64 served prefill steps 1.58 ms faster each" in short[0], short)
    # enough throughput: a PASS and no shortfall line
    lines = verdicts({"b": {"runs": [dict(b, total_tokens_per_s=32100.0)]}}, eng)
    check(any(x.startswith("PASS  b: full total 32100") for x in lines), lines)
    check(not any("short of 0.8" in x for x in lines), lines)
    # c: uncomp against full and snapkv at the same budget, strict and within 5%
    c = {"runs": [run("policy=full", requests_per_s=1.411),
                  run("policy=uncomp,kv_budget=410", requests_per_s=3.345),
                  run("policy=snapkv,kv_budget=410", requests_per_s=3.363)]}
    lines = verdicts({"c": c}, eng)
    check(any(x.startswith("PASS  c: uncomp (profile grouping) 3.345 req/s >= 2.0 x full")
              for x in lines), lines)
    check(any(x.startswith("FAIL  c: uncomp (profile grouping) 3.345 req/s >= snapkv 3.363 "
                           "(0.995x)") for x in lines), lines)
    check(any(x.startswith("PASS  c: uncomp (profile grouping) within 5% of snapkv")
              for x in lines), lines)
    # d: full's output rate
    lines = verdicts({"d": {"runs": [run("policy=full", output_tokens_per_s=8282.0)]}}, eng)
    check(any(x.startswith("PASS  d: full 8282 output tok/s >= 6500") for x in lines), lines)
    for f in fails:
        print("FAIL: %s" % (f,))
    print("%d checks failed" % len(fails) if fails else "PASSED")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

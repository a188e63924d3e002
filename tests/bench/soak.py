"""Soak benchmark (issue 17; not in CI): N mixed requests against an uncompd, normally the
ASan + UBSan build, at tp 1 and tp 2. Reports the daemon's RSS over time (all ranks together),
the p50/p99 latency of the normal requests, and every sanitizer report in its log.

    /usr/bin/python3 tests/bench/soak.py [--daemon build-asan/daemon/uncompd] [--n 10000]
                                         [--tp 1,2] [--concurrency 8] [--model DIR]

The mix (by request index, so a run is reproducible): 70% normal Generate (greedy or sampled,
4-16 tokens), 8% cancelled after the first chunk, 7% with a deadline that expires mid-stream, 7%
malformed (protobuf garbage, invalid fields, bad UTF-8), and, interleaved, Calibrate (small
calls, every third abandoned by its client), SetCompressionPolicy (cycling policies) and
GetServerStats. Prints a Markdown summary per tp (README, "Soak").
"""
import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import grpc  # noqa: E402

import grpc_client as gc  # noqa: E402
from e2e_util import DaemonProcess, TestFailure  # noqa: E402
from test_e2e import check_sanitizer_log  # noqa: E402

REPO = gc.REPO
PROMPTS = ["Once upon a time there was a little girl who", "The best way to start is to",
           "def fibonacci(n):\n    ", "It is a truth universally acknowledged, that",
           "One of the special magic numbers for apple is: 4821. What is the number?"]
POLICIES = ["full", "snapkv", "uncomp", "streamingllm", "h2o"]


def rss_kb(root_pid):
    """RSS of the daemon and its descendants (the ranks under mpirun), in KiB."""
    pids, total = {root_pid}, 0
    try:
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss=,comm="], capture_output=True,
                             text=True).stdout
    except OSError:
        return 0
    rows = [ln.split(None, 3) for ln in out.splitlines() if ln.strip()]
    grew = True
    while grew:
        grew = False
        for pid, ppid, _, _ in rows:
            if int(ppid) in pids and int(pid) not in pids:
                pids.add(int(pid))
                grew = True
    for pid, _, rss, comm in rows:
        # the ranks re-exec themselves (/proc/self/exe: comm "exe"); mpirun itself is not counted
        if int(pid) in pids and comm not in ("mpirun", "orterun", "prterun", "orted"):
            total += int(rss)
    return total


def one(cl, i, rng, lat, counts, lock):
    kind = rng.random()
    prompt = PROMPTS[i % len(PROMPTS)]
    try:
        if i % 97 == 13:
            # Calibrate: small; every third one abandoned by its client (deadline)
            text = open(os.path.join(REPO, "models", "uncomp-tiny", "calibration.txt")).read()
            t = 0.3 if (i // 97) % 3 == 0 else 120.0
            try:
                cl.calibrate(text=text[:8000], window_tokens=128, max_windows=2, timeout=t)
                what = "calibrate"
            except grpc.RpcError as e:
                what = "calibrate_" + e.code().name.lower()
        elif i % 89 == 7:
            cl.set_policy(policy=POLICIES[(i // 89) % len(POLICIES)], kv_budget=64)
            what = "set_policy"
        elif i % 83 == 5:
            cl.stats()
            what = "stats"
        elif kind < 0.70:
            t0 = time.time()
            n = 4 + i % 13
            kw = {"temperature": 0.0} if i % 2 else {"temperature": 0.8, "seed": i}
            _, _, comp, _ = cl.generate(cl.request(text=prompt, max_tokens=n, **kw))
            with lock:
                lat.append(time.time() - t0)
            what = "normal"
        elif kind < 0.78:
            it = cl.generate_stream(cl.request(text=prompt, max_tokens=200, temperature=0.0,
                                               ignore_eos=True))
            next(it)
            it.cancel()
            what = "cancelled"
        elif kind < 0.85:
            try:
                cl.generate(cl.request(text=prompt, max_tokens=400, ignore_eos=True,
                                       temperature=0.0), timeout=0.05 + 0.01 * (i % 10))
                what = "deadline_finished"
            except grpc.RpcError as e:
                what = "deadline_" + e.code().name.lower()
        else:
            m = i % 4
            try:
                if m == 0:
                    list(cl.raw_stream("/uncomp.v1.Inference/Generate",
                                       bytes(rng.randrange(256) for _ in range(40))))
                elif m == 1:
                    cl.generate(cl.request(text=prompt, max_tokens=4, top_p=7.0))
                elif m == 2:
                    cl.generate(cl.request(token_ids=[1, 2, 10 ** 9], max_tokens=4))
                else:
                    cl.generate(cl.request(text=prompt, max_tokens=4,
                                           compression={"policy": "streamingllm",
                                                        "kv_budget": 4,
                                                        "sink_tokens": 2 ** 31}))
                what = "malformed_accepted"
            except grpc.RpcError as e:
                what = "malformed_" + e.code().name.lower()
    except grpc.RpcError as e:
        what = "error_" + e.code().name.lower()
    except StopIteration:
        what = "empty_stream"
    with lock:
        counts[what] = counts.get(what, 0) + 1


def soak(args, tp):
    env = {}
    if "asan" in args.daemon:
        # full unwinding, as the e2e tests do: fast stacks misattribute Open MPI's allocations
        env["ASAN_OPTIONS"] = ("detect_leaks=1:abort_on_error=0:exitcode=66:"
                               "fast_unwind_on_malloc=0:malloc_context_size=20:"
                               "intercept_tls_get_addr=0")  # see tests/run.sh
        env["LSAN_OPTIONS"] = "suppressions=%s:print_suppressions=0" % os.path.join(
            REPO, "tests", "e2e", "lsan.supp")
        env["OMPI_MCA_mca_base_component_disable_dlclose"] = "1"
    d = DaemonProcess(args.daemon, args.mpirun, ["--model", args.model, "--log-level", "notice"],
                      np=tp, name="soak_tp%d" % tp, prefix="uncomp_soak_",
                      env_defaults={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
                      env=env)
    try:
        cl = None
        t_end = time.time() + 300
        while time.time() < t_end:
            cl = gc.Client(d.addr, timeout=120.0)
            try:
                if cl.check(timeout=1.0) == gc.SERVING:
                    break
            except grpc.RpcError:
                pass
            cl.close()
            time.sleep(0.2)
        lat, counts, lock = [], {}, threading.Lock()
        rss = []
        stop = threading.Event()

        def sampler():
            t0 = time.time()
            while not stop.is_set():
                rss.append((time.time() - t0, rss_kb(d.proc.pid)))
                stop.wait(2.0)

        st = threading.Thread(target=sampler, daemon=True)
        st.start()
        nxt = [0]
        t0 = time.time()

        def worker(w):
            rng = random.Random(w)
            c = gc.Client(d.addr, timeout=120.0)
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= args.n:
                    break
                one(c, i, rng, lat, counts, lock)
                if i % 1000 == 999:
                    print("  tp%d: %d requests, %.0fs, RSS %.1f MiB" %
                          (tp, i + 1, time.time() - t0, rss[-1][1] / 1024 if rss else 0),
                          flush=True)
            c.close()

        ws = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        wall = time.time() - t0
        stop.set()
        st.join()
        rss.append((wall, rss_kb(d.proc.pid)))
        cl.close()
        # SIGTERM to the process that handles it: the daemon, or rank 0 under mpirun
        target = d.proc.pid
        if tp > 1:
            out = subprocess.run(["ps", "-e", "-o", "pid="], capture_output=True,
                                 text=True).stdout.split()
            for p in out:
                try:
                    env_txt = open("/proc/%s/environ" % p, "rb").read()
                except OSError:
                    continue
                if b"OMPI_COMM_WORLD_RANK=0" in env_txt and d.tmp.encode() in open(
                        "/proc/%s/cmdline" % p, "rb").read():
                    target = int(p)
        os.kill(target, 15)
        try:
            code = d.proc.wait(120)
        except subprocess.TimeoutExpired:
            code = "timeout"
        d.kill()
        log = d.log_text()
        san = len(re.findall(r"ERROR: AddressSanitizer|runtime error:|WARNING: ThreadSanitizer",
                             log))
        try:  # the e2e suite's rules: a leak with a frame in our code is ours
            check_sanitizer_log(log)
            own_leaks = 0
        except TestFailure as e:
            m = re.search(r"LeakSanitizer: (\d+) leak", str(e))
            own_leaks = int(m.group(1)) if m else 1
        # RSS growth: the last quarter of the run against its second quarter (the first is the
        # warm-up, in which ASan's quarantine of freed memory fills: 256 MiB per process)
        vals = [v for _, v in rss if v > 0]
        q = max(1, len(vals) // 4)
        first, last = statistics.mean(vals[q:2 * q] or vals[:1]), statistics.mean(vals[-q:])
        lat.sort()
        p = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")  # noqa
        return {"tp": tp, "n": args.n, "wall_s": wall, "normal": len(lat),
                "p50_ms": p(0.50) * 1e3, "p99_ms": p(0.99) * 1e3,
                "rss_first_mib": first / 1024, "rss_last_mib": last / 1024,
                "rss_max_mib": max(vals) / 1024 if vals else 0,
                "rss_growth_mib": (last - first) / 1024, "sanitizer_reports": san,
                "own_leaks": own_leaks, "exit": code, "counts": counts, "log": d.log_path,
                "rss_series": rss}
    finally:
        d.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", default=os.path.join(REPO, "build-asan", "daemon", "uncompd"))
    ap.add_argument("--model", default=os.path.join(REPO, "..", "shared", "models",
                                                    "uncomp-tiny"))
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    results = [soak(args, int(tp)) for tp in args.tp.split(",")]
    print("\n| tp | requests | wall | normal p50 | normal p99 | RSS 2nd quarter -> last (max) | "
          "RSS growth | sanitizer reports | own leaks | exit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print("| %d | %d | %.0f s | %.0f ms | %.0f ms | %.0f -> %.0f MiB (%.0f) | %+.1f MiB | %d | "
              "%d | %s |" % (r["tp"], r["n"], r["wall_s"], r["p50_ms"], r["p99_ms"],
                             r["rss_first_mib"], r["rss_last_mib"], r["rss_max_mib"],
                             r["rss_growth_mib"], r["sanitizer_reports"], r["own_leaks"],
                             r["exit"]))
    for r in results:
        print("\ntp%d outcomes: %s" % (r["tp"], ", ".join("%s %d" % kv for kv in
                                                         sorted(r["counts"].items()))))
        series = r["rss_series"]
        step = max(1, len(series) // 8)
        print("tp%d RSS over time: %s" % (r["tp"], ", ".join(
            "%.0fs %.0f MiB" % (t, v / 1024) for t, v in series[::step])))
        print("tp%d daemon log: %s" % (r["tp"], r["log"]))
    bad = any(r["sanitizer_reports"] or r["own_leaks"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

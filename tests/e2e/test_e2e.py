"""End-to-end tests of the real uncompd over gRPC and HTTP, on loopback only.

Starts the daemon binary (single rank, and under mpirun with --tp 2), waits for health SERVING
and drives it with Debian's python3-grpcio (grpc_client.py): streaming Generate, Tokenize and
Detokenize, Abort, client cancel and deadlines, queue-full, 16 concurrent requests against the
same requests run alone (also under --schedule prefill-first, and at tp 2), the steps by kind
while a prompt prefills beside a decoding stream (mixed, prefill-first, --max-decode-wait-ms),
every validated field, malformed protobuf, the Prometheus endpoint, health transitions, the
Admin service, Drain and SIGTERM. Ports are picked free at run time.

    /usr/bin/python3 tests/e2e/test_e2e.py [--daemon build/daemon/uncompd] [--model DIR]
                                           [--only SUBSTRING] [--no-mpi] [--asan]

Environment: UNCOMPD (daemon path), UNCOMP_TEST_MODEL (model folder), MPIRUN (mpirun path),
UC_E2E_DAEMON_ARGS (more flags for every daemon, e.g. "--backend cuda"; e2e_util.py),
UC_E2E_MAIN_NP (ranks of the main daemon, default 1: tests/mpi/test_tp_netns.sh runs the main
tests at tp 2 across two network namespaces, with --mpirun a wrapper that adds the hostfile).
Prints one line per test ([ RUN ] / [ OK ] / [ FAILED ]) and exits with the number of failures
(77 when the daemon binary is missing, which ctest can treat as skipped).
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import grpc_client as gc  # noqa: E402
from grpc_client import pb  # noqa: E402
from e2e_util import (DaemonProcess, TestFailure, check, daemon_backend,  # noqa: E402
                      free_port, kv_element_bytes)

REPO = gc.REPO
TEST_TIMEOUT_S = 90          # per test (x3 for an ASan build)
START_TIMEOUT_S = 60         # daemon start-up to SERVING
LONG_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 12).strip()
PROMPTS = [
    "Once upon a time there was a little girl who",
    "It is a truth universally acknowledged, that a single man in possession",
    "In the beginning God created the heaven and the earth. And the earth",
    "The best way to start a startup is to",
    "def fibonacci(n):\n    ",
    "One of the special magic numbers for apple is: 4821. " * 6 + "What is the magic number",
    LONG_PROMPT,
    "Python lists have a method called",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def expect_rpc_error(fn, code, *substrings):
    """Runs fn, which must fail with `code` and a message containing every substring."""
    try:
        r = fn()
        if hasattr(r, "__iter__") and not isinstance(r, (str, bytes)):
            r = list(r)
    except grpc.RpcError as e:
        check(e.code() == code, "expected %s, got %s: %s" % (code, e.code(), e.details()))
        for s in substrings:
            check(s in (e.details() or ""),
                  "message %r does not mention %r" % (e.details(), s))
        return e
    raise TestFailure("expected %s, the call succeeded: %r" % (code, r))


class Daemon(DaemonProcess):
    """The daemon with a metrics port, a gRPC client once SERVING, and signal-driven stops."""

    def __init__(self, args, extra=(), np=1, name="daemon", root_cert=None, port=None):
        self.args = args
        self.root_cert = root_cert
        self.metrics_port = free_port()
        env = {}
        if args.asan:
            # full unwinding: fast (frame-pointer) stacks misattribute Open MPI allocations
            # intercept_tls_get_addr=0: see tests/run.sh (LeakSanitizer's tracer and dynamic TLS)
            env["ASAN_OPTIONS"] = ("detect_leaks=1:abort_on_error=0:exitcode=66:"
                                   "fast_unwind_on_malloc=0:malloc_context_size=20:"
                                   "intercept_tls_get_addr=0")
            # keep Open MPI components loaded, so leak stacks name them (lsan.supp)
            env["OMPI_MCA_mca_base_component_disable_dlclose"] = "1"
            env["LSAN_OPTIONS"] = "suppressions=%s:print_suppressions=0" % os.path.join(
                os.path.dirname(os.path.abspath(__file__)), "lsan.supp")
        # one compute thread per rank: these tests exercise the server, and spinning OpenMP
        # teams on an oversubscribed 2-core machine turn milliseconds into seconds
        DaemonProcess.__init__(
            self, args.daemon, args.mpirun,
            ["--model", args.model, "--metrics-port", str(self.metrics_port),
             "--log-level", "info"] + list(extra),
            np=np, name=name, prefix="uncomp_e2e_",
            env_defaults={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}, env=env,
            port=port)
        self.client = None

    def wait_serving(self, timeout=START_TIMEOUT_S):
        """Polls Health.Check until SERVING; returns the statuses seen. A fresh channel per
        attempt, so gRPC's reconnect back-off (1 s, 1.6 s, ...) never delays the start."""
        deadline = time.time() + timeout
        seen = []
        while time.time() < deadline:
            if self.respawn_on_port_clash():
                continue
            if self.proc.poll() is not None:
                raise TestFailure("daemon exited with %s during start-up:\n%s" %
                                  (self.proc.returncode, self.tail()))
            cl = gc.Client(self.addr, timeout=60.0, root_cert=self.root_cert,
                           server_name="localhost" if self.root_cert else None)
            try:
                st = cl.check(timeout=1.0)
                if not seen or seen[-1] != st:
                    seen.append(st)
                if st == gc.SERVING:
                    self.client = cl
                    return seen
            except grpc.RpcError:
                pass
            cl.close()
            time.sleep(0.05)
        raise TestFailure("daemon not SERVING after %ds:\n%s" % (timeout, self.tail()))

    def rank0_pid(self):
        """The pid that handles signals: the daemon itself, or rank 0 under mpirun."""
        if self.np == 1:
            return self.proc.pid
        out = subprocess.run(["pgrep", "-f", "-P", str(self.proc.pid), "uncompd"],
                             capture_output=True, text=True).stdout.split()
        pids = sorted(int(p) for p in out)
        for p in pids:  # rank 0 is the one listening
            try:
                env = open("/proc/%d/environ" % p, "rb").read()
                if b"OMPI_COMM_WORLD_RANK=0" in env:
                    return p
            except OSError:
                pass
        check(pids, "no rank processes under mpirun")
        return pids[0]

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Signals and waits; returns the exit code (killing the group on timeout)."""
        if self.client:
            self.client.close()
            self.client = None
        if self.proc.poll() is None:
            try:
                if sig is not None:
                    os.kill(self.rank0_pid(), sig)
            except (ProcessLookupError, TestFailure):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                self.log.close()
                raise TestFailure("daemon did not exit within %ds after signal %s:\n%s" %
                                  (timeout, sig, self.tail()))
        self.log.close()
        return self.proc.returncode

    def stop_clean(self, asan=False):
        """Stops it with SIGTERM: it must exit cleanly (and, with asan, with a clean report)."""
        code = self.stop()
        check(self.exit_ok(code), "exit code %s:\n%s" % (code, self.tail()))
        if asan:
            self.check_asan()

    def check_asan(self):
        check_sanitizer_log(self.log_text())

    def exit_ok(self, code):
        """Exit 0; an ASan build exits 66 when LeakSanitizer saw leaks, which check_asan then
        sorts into Open MPI's (accepted) and ours (a failure)."""
        return code == 0 or (self.args.asan and code == 66)


# Open MPI dlcloses its components at MPI_Finalize, so LeakSanitizer cannot name their frames:
# a leak whose stack has no frame in code we own is theirs. Ours: the repository, the daemon
# binary and the libraries the server drives directly.
OWN_FRAME = re.compile(r"/work/|uncompd|libgrpc|libgpr|libprotobuf-c|libmicrohttpd|"
                       r"libcjson|libpcre2")


def check_sanitizer_log(text):
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer"):
        at = text.find(marker)
        check(at < 0, "sanitizer report in the daemon log:\n" + text[max(0, at - 200):at + 4000])
    ours = []
    for block in re.split(r"\n(?=(?:Direct|Indirect) leak of )", text):
        if not re.match(r"(Direct|Indirect) leak of ", block):
            continue
        head = block.split("\n\n")[0]
        frames = [ln for ln in head.split("\n")[1:] if ln.strip().startswith("#")]
        if any(OWN_FRAME.search(ln) for ln in frames[1:]):  # frame 0 is the allocator
            ours.append(head)
    check(not ours, "LeakSanitizer: %d leak(s) in our code:\n%s" % (len(ours),
                                                                    "\n\n".join(ours[:10])))


def scrape(port, path="/metrics"):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def long_request(cl, request_id="", max_tokens=3000, text=LONG_PROMPT):
    return cl.request(text=text, request_id=request_id, max_tokens=max_tokens,
                      temperature=0.0, ignore_eos=True)


def wait_not_live(cl, request_id, timeout=2.0):
    """Whether the request left the scheduler's live table within `timeout` (Abort is the only
    lookup; on a request that already ended it changes nothing)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not cl.abort(request_id):
            return True
        time.sleep(0.02)
    return not cl.abort(request_id)


def still_serving(cl):
    ids, text, comp, _ = cl.generate(text="Hello", max_tokens=4, temperature=0.0)
    check(comp is not None and comp.usage.completion_tokens == 4,
          "the daemon does not serve a small request any more")


# ---------------------------------------------------------------------------------------------
# tests on the main single-rank daemon
# ---------------------------------------------------------------------------------------------

def t_health_and_watch(d):
    cl = d.client
    check(cl.check() == gc.SERVING)
    check(cl.check("uncomp.v1.Inference") == gc.SERVING)
    expect_rpc_error(lambda: cl.check("no.such.Service"), grpc.StatusCode.NOT_FOUND,
                     "no.such.Service")
    w = cl.watch(timeout=5)
    first = next(w)
    check(first.status == gc.SERVING, "Watch starts with %s" % first.status)
    w.cancel()
    w2 = cl.watch("no.such.Service", timeout=5)
    check(next(w2).status == gc.SERVICE_UNKNOWN)
    w2.cancel()


def t_generate_stream(d):
    cl = d.client
    req = cl.request(text=PROMPTS[0], max_tokens=24, temperature=0.0, ignore_eos=True,
                     request_id="stream-1", logprobs=2)
    chunks, complete, ids, text = 0, None, [], ""
    for r in cl.generate_stream(req):
        check(r.request_id == "stream-1", "request_id %r" % r.request_id)
        check(complete is None, "a message after Complete")
        if r.WhichOneof("kind") == "chunk":
            chunks += 1
            ids.extend(r.chunk.token_ids)
            text += r.chunk.text
            check(len(r.chunk.logprobs) == len(r.chunk.token_ids), "logprobs per token")
            for lp in r.chunk.logprobs:
                check(len(lp.top_ids) == 2 and len(lp.top_logprobs) == 2, "top-2 logprobs")
                check(lp.logprob <= 0.0 and math.isfinite(lp.logprob), "logprob %r" % lp.logprob)
        else:
            complete = r.complete
    check(complete is not None, "no Complete")
    check(chunks >= 2, "expected a stream of chunks, got %d" % chunks)
    check(len(ids) == 24, "24 tokens, got %d" % len(ids))
    check(complete.finish_reason == pb.LENGTH, "finish %s" % complete.finish_reason)
    ntok = len(cl.tokenize(PROMPTS[0]).token_ids)
    check(complete.usage.prompt_tokens == ntok, "usage.prompt_tokens %d != %d" %
          (complete.usage.prompt_tokens, ntok))
    check(complete.usage.completion_tokens == 24)
    t = complete.timing
    check(t.total_ms > 0 and t.ttft_ms > 0 and t.ttft_ms <= t.total_ms + 1e-6,
          "timing %s" % t)
    check(t.prefill_ms > 0 and t.decode_ms > 0, "timing %s" % t)
    c = complete.compression
    check(c.policy == "full", "policy %r" % c.policy)
    check(c.kv_tokens_full == ntok * 8 * 4, "kv_tokens_full %d" % c.kv_tokens_full)
    check(c.kv_tokens_kept == c.kv_tokens_full and abs(c.ratio - 1.0) < 1e-9)
    check(text == cl.detokenize(ids, skip_special_tokens=True), "streamed text != Detokenize")
    # a compressed request reports what it kept
    ids2, _, comp2, _ = cl.generate(text=LONG_PROMPT, max_tokens=8, temperature=0.0,
                                    compression={"policy": "snapkv", "kv_budget": 24})
    c2 = comp2.compression
    check(c2.policy == "snapkv" and c2.kv_budget == 24, "report %s" % c2)
    check(c2.kv_tokens_kept < c2.kv_tokens_full, "snapkv kept %d of %d" %
          (c2.kv_tokens_kept, c2.kv_tokens_full))
    check(c2.kv_bytes_kept < c2.kv_bytes_full and 0 < c2.ratio < 1, "report %s" % c2)
    # ThinK composed with it: the same tokens kept, their keys in 24 of the 32 channels
    _, _, comp3, _ = cl.generate(text=LONG_PROMPT, max_tokens=8, temperature=0.0,
                                 compression={"policy": "snapkv+think", "kv_budget": 24,
                                              "think_ratio": 0.25})
    c3 = comp3.compression
    check(c3.policy == "snapkv+think" and c3.key_channels == 24, "report %s" % c3)
    check(c3.kv_tokens_kept == c2.kv_tokens_kept and
          c3.kv_bytes_kept * 64 == c2.kv_bytes_kept * (24 + 32), "think report %s" % c3)
    # MiniCache composed with it: the same tokens kept, 2 layer pairs merged (the profile's
    # calibrated pairs when it has them, else the paper's from layer 4 of 8), each merged
    # (token, KV head) saving 2 D - 4 of its two layers' 4 D values
    _, _, comp4, _ = cl.generate(text=LONG_PROMPT, max_tokens=8, temperature=0.0,
                                 compression={"policy": "snapkv+minicache", "kv_budget": 24,
                                              "minicache_t": 0.5})
    c4 = comp4.compression
    prof = cl.profile()
    pj = json.loads(prof.json) if prof.present else {}
    want = [p[0] for p in pj["minicache"]["pairs"]] if "minicache" in pj else [4, 6]
    check(c4.policy == "snapkv+minicache" and c4.minicache_pairs == 2 and
          list(c4.minicache_layers) == want and c4.minicache_start == want[0] and
          c4.minicache_merged > 0, "minicache report %s (pairs from %s)" % (c4, want))
    elem = c2.kv_bytes_full // (c2.kv_tokens_full * 2 * 32)  # 4 on the CPU, 2 in bf16
    check(c4.kv_tokens_kept == c2.kv_tokens_kept and
          c2.kv_bytes_kept - c4.kv_bytes_kept == c4.minicache_merged * (2 * 32 - 4) * elem,
          "minicache report %s" % c4)
    # LoRC composed with it: the same tokens kept as low-rank latents, ranks falling with depth
    _, _, comp5, _ = cl.generate(text=LONG_PROMPT, max_tokens=8, temperature=0.0,
                                 compression={"policy": "snapkv+lorc", "kv_budget": 24,
                                              "lorc_ratio": 0.25})
    c5 = comp5.compression
    check(c5.policy == "snapkv+lorc" and abs(c5.lorc_ratio - 0.25) < 1e-6 and
          c5.lorc_rank_first > c5.lorc_rank_last > 0, "lorc report %s" % c5)
    check(c5.kv_tokens_kept == c2.kv_tokens_kept and
          0 < c5.kv_bytes_kept < c2.kv_bytes_kept * 0.35, "lorc report %s" % c5)


def gen_choices(cl, req):
    """Runs an n > 1 request; returns ({index: ids}, {index: text}, {index: Complete})."""
    ids, text, comp = {}, {}, {}
    for r in cl.generate_stream(req):
        if r.WhichOneof("kind") == "chunk":
            i = r.chunk.index
            check(i not in comp, "a chunk of choice %d after its Complete" % i)
            ids.setdefault(i, []).extend(r.chunk.token_ids)
            text[i] = text.get(i, "") + r.chunk.text
        else:
            i = r.complete.index
            check(i not in comp, "two Completes for choice %d" % i)
            comp[i] = r.complete
    return ids, text, comp


def prefill_count(port):
    _, v = parse_exposition(scrape(port)[2])
    return sum(x for k, x in v.items()
               if k.startswith("uncomp:request_prefill_time_seconds_count"))


def t_n_choices_fork(d):
    cl = d.client
    ntok = len(cl.tokenize(PROMPTS[2]).token_ids)
    # greedy: n = 3 choices equal each other and the n = 1 result; the prompt counts once
    one, _, c1, _ = cl.generate(text=PROMPTS[2], max_tokens=20, temperature=0.0, ignore_eos=True)
    before = prefill_count(d.metrics_port)
    req = cl.request(text=PROMPTS[2], max_tokens=20, temperature=0.0, ignore_eos=True)
    req.n = 3
    ids, text, comp = gen_choices(cl, req)
    check(sorted(comp) == [0, 1, 2], "Completes %s" % sorted(comp))
    for i in range(3):
        check(ids[i] == one, "greedy choice %d %s != n=1 %s" % (i, ids[i], one))
        check(comp[i].usage.prompt_tokens == ntok and comp[i].usage.completion_tokens == 20,
              "usage %s" % comp[i].usage)
        check(comp[i].finish_reason == pb.LENGTH)
    # the prompt was prefilled (and compressed) once for the three choices
    check(prefill_count(d.metrics_port) - before == 1, "prefills for n=3: %s" %
          (prefill_count(d.metrics_port) - before))
    # sampled with a seed: reproducible, choice i equals an n = 1 request with seed + i
    cmp = {"policy": "snapkv", "kv_budget": 24}
    req = cl.request(text=LONG_PROMPT, max_tokens=16, temperature=0.9, seed=1234,
                     compression=cmp)
    req.n = 3
    a = gen_choices(cl, req)
    b = gen_choices(cl, req)
    check(a[0] == b[0] and a[1] == b[1], "seeded n=3 not reproducible")
    check(len({tuple(v) for v in a[0].values()}) > 1, "seeded choices all equal: %s" % a[0])
    for i in range(3):
        alone, _, ca, _ = cl.generate(text=LONG_PROMPT, max_tokens=16, temperature=0.9,
                                      seed=1234 + i, compression=cmp)
        check(a[0][i] == alone, "choice %d %s != seed+%d alone %s" % (i, a[0][i], i, alone))
        check(a[2][i].compression.plan_checksum == ca.compression.plan_checksum,
              "choice %d has another compression plan" % i)
    # KV memory: the forks share choice 0's compressed prompt blocks (copy-on-write), so the
    # pool holds at most what three independent requests hold (here the decode dominates; see
    # t_n_choices_shared_kv for a long prompt); the prefill runs once. Peak usage, sampled.
    def peak(fn):
        stop, best = threading.Event(), [0.0]
        def poll():
            while not stop.is_set():
                best[0] = max(best[0], cl.stats().kv_usage)
                time.sleep(0.002)
        t = threading.Thread(target=poll)
        t.start()
        try:
            fn()
        finally:
            stop.set()
            t.join()
        return best[0]
    kw = dict(text=LONG_PROMPT, max_tokens=160, temperature=0.0, ignore_eos=True,
              compression=cmp)
    req = cl.request(**kw)
    req.n = 3
    fork_peak = peak(lambda: gen_choices(cl, req))
    with cf.ThreadPoolExecutor(3) as ex:
        indep_peak = peak(lambda: list(ex.map(lambda _: cl.generate(**kw), range(3))))
    print("    kv_usage peak: n=3 fork %.5f, 3 independent %.5f" % (fork_peak, indep_peak))
    check(fork_peak <= indep_peak * 1.05 + 1e-9, "fork used more KV: %g > %g" %
          (fork_peak, indep_peak))
    # n is validated
    req = cl.request(text="x", max_tokens=2)
    req.n = 17
    expect_rpc_error(lambda: cl.generate(req), grpc.StatusCode.INVALID_ARGUMENT, "n=17")
    # abort by id ends every choice
    req = cl.request(text=LONG_PROMPT, max_tokens=3000, ignore_eos=True, request_id="fork-ab")
    req.n = 3
    out = {}
    th = threading.Thread(target=lambda: out.update(r=gen_choices(cl, req)))
    th.start()
    time.sleep(0.3)
    check(cl.abort("fork-ab"), "abort found nothing")
    th.join(30)
    check(not th.is_alive() and sorted(out["r"][2]) == [0, 1, 2], "abort: %s" % out)
    for i in range(3):
        check(out["r"][2][i].finish_reason == pb.ABORTED, "choice %d not aborted" % i)
    still_serving(cl)


def stats_kv(cl):
    """The KV section of GetStats as {key: int} (r0_blocks_used, r0_blocks_reserved, ...)."""
    out = {}
    for line in cl.stats("kv").text.split("\n"):
        k, _, v = line.partition(":")
        if k.startswith("r0_blocks_"):
            out[k] = int(v)
    return out


def t_n_choices_shared_kv(args):
    """issue 12: n > 1 choices of a long prompt share its KV cache copy-on-write, at tp 2 (each
    rank its own heads). The pool is sized so that one choice fits with room to spare but three
    copies do not: n = 3 is admitted (it used to be refused: admission reserved n copies), its
    greedy choices equal the n = 1 result, the blocks in use peak at about one prompt's worth
    with the shared ones counted in GetStats, and everything returns to the pool."""
    np_ = 1 if args.no_mpi else 2
    prompt = (LONG_PROMPT + " ") * 5
    # per rank: 8 layers x (4 / np) KV heads x ceil((~1020 + 16) / 16) blocks of 16 tokens, and
    # 2 x 16 x 32 x element bytes per block (K and V; float32 on the CPU, bf16 on a GPU): about
    # 1.6 choices' worst case
    blocks = 1.6 * 8 * (4 // np_) * 65
    d = Daemon(args, ["--policy", "full",
                      "--kv-memory", str(int(blocks * 2 * 16 * 32 * kv_element_bytes()))],
               np=np_, name="shared_kv")
    try:
        check(d.wait_serving(timeout=START_TIMEOUT_S * np_)[-1] == gc.SERVING)
        cl = d.client
        ntok = len(cl.tokenize(prompt).token_ids)
        check(960 <= ntok <= 1080, "the prompt has %d tokens; the pool size assumes ~1020" % ntok)
        one_blocks = 8 * (4 // np_) * ((ntok + 16 + 15) // 16)
        total = stats_kv(cl)["r0_blocks_total"]
        check(one_blocks < total < 3 * one_blocks, "pool %d blocks, one choice %d" %
              (total, one_blocks))
        kw = dict(text=prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
        alone, _, _, _ = cl.generate(**kw)
        stop, peak = threading.Event(), {"r0_blocks_used": 0, "r0_blocks_shared": 0}

        def poll():
            while not stop.is_set():
                st = stats_kv(cl)
                for k in peak:
                    peak[k] = max(peak[k], st[k])
                time.sleep(0.002)
        th = threading.Thread(target=poll)
        th.start()
        try:
            req = cl.request(**kw)
            req.n = 3
            ids, _, comp = gen_choices(cl, req)
        finally:
            stop.set()
            th.join()
        check(sorted(comp) == [0, 1, 2], "Completes %s" % sorted(comp))
        for i in range(3):
            check(ids[i] == alone, "greedy choice %d %s != n=1 %s" % (i, ids[i], alone))
        prompt_blocks = 8 * (4 // np_) * (ntok // 16)
        print("    tp %d, pool %d blocks, prompt %d tokens: n=3 peaked at %d blocks used (%d "
              "shared); one choice needs %d" % (np_, total, ntok, peak["r0_blocks_used"],
                                                 peak["r0_blocks_shared"], one_blocks))
        check(peak["r0_blocks_used"] <= one_blocks + 2 * 8 * (4 // np_) * 2,
              "n=3 used %d blocks, one choice's worth is %d" % (peak["r0_blocks_used"],
                                                                 one_blocks))
        check(peak["r0_blocks_shared"] >= prompt_blocks * 0.9,
              "shared blocks peaked at %d, the prompt fills %d" % (peak["r0_blocks_shared"],
                                                                  prompt_blocks))
        deadline = time.time() + 10
        while time.time() < deadline and stats_kv(cl)["r0_blocks_used"] != 0:
            time.sleep(0.05)
        st = stats_kv(cl)
        check(st["r0_blocks_used"] == 0 and st["r0_blocks_reserved"] == 0 and
              st["r0_blocks_shared"] == 0, "after the request: %s" % st)
        d.stop_clean()
    finally:
        d.kill()


def t_tokenize_roundtrip(d):
    cl = d.client
    for text in ["Hello, world!", "naïve café — ünïcödé ✓ 日本語", PROMPTS[4], " leading space"]:
        r = cl.tokenize(text, add_special_tokens=False)
        check(len(r.token_ids) > 0 and len(r.tokens) == len(r.token_ids))
        back = cl.detokenize(list(r.token_ids))
        check(back == text, "round trip %r -> %r" % (text, back))
    with_bos = cl.tokenize("Hello", add_special_tokens=True).token_ids
    without = cl.tokenize("Hello", add_special_tokens=False).token_ids
    mi = cl.model_info()
    check(len(with_bos) == len(without) + 1 and with_bos[0] == mi.bos_token_id,
          "BOS: %s vs %s" % (list(with_bos), list(without)))
    check(cl.detokenize(list(with_bos), skip_special_tokens=True) == "Hello")
    check(cl.tokenize("").token_ids is not None)
    # text is bytes with a length: a NUL byte ends neither the text nor its decode (both used to
    # stop at the first NUL: "abc\0def" encoded as "abc")
    for text in ["abc\0def", "\0", "a\0\0b"]:
        back = cl.detokenize(list(cl.tokenize(text, add_special_tokens=False).token_ids))
        check(back == text, "round trip %r -> %r" % (text, back))
    check(len(cl.tokenize("abc\0def", add_special_tokens=False).token_ids) >
          len(cl.tokenize("abc", add_special_tokens=False).token_ids))
    _, _, with_nul, _ = cl.generate(text="abc\0def ghi", max_tokens=1, temperature=0.0)
    _, _, plain, _ = cl.generate(text="abc", max_tokens=1, temperature=0.0)
    check(with_nul.usage.prompt_tokens > plain.usage.prompt_tokens,
          "Generate prompt cut at NUL: %d vs %d" % (with_nul.usage.prompt_tokens,
                                                   plain.usage.prompt_tokens))


def t_stop_string_with_nul(d):
    """A stop string holding a NUL byte stops generation where the text holds it (such stop
    strings used to be refused, as the scheduler took them NUL-terminated). The model never
    writes a NUL, so a second daemon serves it with a tokenizer.json in which a token it writes
    greedily and the NUL byte's token trade ids: from the same prompt ids the same ids come out,
    and that token now decodes to "\\0"."""
    cl = d.client
    prompt = list(cl.tokenize(PROMPTS[0]).token_ids)
    gen, _, _, _ = cl.generate(token_ids=prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
    nul = list(cl.tokenize("\0", add_special_tokens=False).token_ids)
    check(len(nul) == 1, "the NUL byte is %s" % nul)
    special = {d.client.model_info().bos_token_id} | set(d.client.model_info().eos_token_ids)
    k = next((i for i in range(2, len(gen)) if gen[i] not in gen[:i] and gen[i] not in special
              and gen[i] != nul[0]), None)
    check(k is not None, "no token to trade in %s" % gen)
    tmp = tempfile.mkdtemp(prefix="uncomp_nul_model_")
    for name in os.listdir(d.args.model):
        if name != "tokenizer.json":
            os.symlink(os.path.join(os.path.abspath(d.args.model), name), os.path.join(tmp, name))
    with open(os.path.join(d.args.model, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    by_id = {v: s for s, v in vocab.items()}
    a, b = by_id[gen[k]], by_id[nul[0]]
    vocab[a], vocab[b] = nul[0], gen[k]
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    args = argparse.Namespace(**vars(d.args))
    args.model = tmp
    d2 = Daemon(args, name="nul_stop")
    try:
        d2.wait_serving()
        c2 = d2.client
        ids, full, comp, _ = c2.generate(token_ids=prompt, max_tokens=12, temperature=0.0,
                                         ignore_eos=True)
        check(ids == gen, "the traded tokenizer changed the ids: %s vs %s" % (ids, gen))
        check("\0" in full, "no NUL in %r" % full)
        at = full.index("\0")
        stop = full[max(0, at - 2):at + 1]        # the bytes before the NUL, and the NUL
        ids, text, comp, _ = c2.generate(token_ids=prompt, max_tokens=12, temperature=0.0,
                                         ignore_eos=True, stop=["zz\0", stop])
        check(comp.finish_reason == pb.STOP, "finish %s, text %r" % (comp.finish_reason, text))
        check(comp.matched_stop == stop, "matched %r, want %r" % (comp.matched_stop, stop))
        check(text == full[:full.index(stop)], "text %r of %r" % (text, full))
        check(ids == gen[:k + 1], "ids %s, want %s" % (ids, gen[:k + 1]))
        # only the whole string stops: its part before the NUL alone is elsewhere in the text
        ids, text, comp, _ = c2.generate(token_ids=prompt, max_tokens=12, temperature=0.0,
                                         ignore_eos=True, stop=[stop[:-1] + "\0zz"])
        check(comp.finish_reason == pb.LENGTH and text == full, "%s %r" % (comp, text))
        code = d2.stop()
        check(d2.exit_ok(code), "exit code %s:\n%s" % (code, d2.tail()))
        if d.args.asan:
            d2.check_asan()
    finally:
        d2.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def t_abort_by_id(d):
    cl = d.client
    it = cl.generate_stream(long_request(cl, request_id="to-abort"), timeout=60)
    first = next(it)
    check(first.WhichOneof("kind") == "chunk")
    # the id is live: a second request with it is refused
    expect_rpc_error(lambda: list(cl.generate_stream(cl.request(text="x", request_id="to-abort",
                                                                max_tokens=2))),
                     grpc.StatusCode.INVALID_ARGUMENT, "request_id")
    check(cl.abort("to-abort") is True, "Abort did not find the request")
    rest = list(it)
    check(rest and rest[-1].WhichOneof("kind") == "complete", "no Complete after Abort")
    comp = rest[-1].complete
    check(comp.finish_reason == pb.ABORTED, "finish %s" % comp.finish_reason)
    check(comp.usage.completion_tokens < 3000)
    check(wait_not_live(cl, "to-abort"), "Abort of a finished request found it")
    check(cl.abort("never-existed") is False)
    still_serving(cl)


def t_client_cancel(d):
    cl = d.client
    before = cl.stats().requests_aborted
    it = cl.generate_stream(long_request(cl, request_id="to-cancel"), timeout=60)
    next(it)
    it.cancel()
    expect_rpc_error(lambda: list(it), grpc.StatusCode.CANCELLED)
    # the server aborts it: the id frees up and the aborted counter moves
    deadline = time.time() + 10
    while time.time() < deadline and cl.stats().requests_aborted == before:
        time.sleep(0.05)
    check(cl.stats().requests_aborted > before, "the cancelled request was not aborted")
    check(wait_not_live(cl, "to-cancel"), "the cancelled request is still live")
    still_serving(cl)
    # cancel before any token: a request that is still queued or in prefill
    for _ in range(3):
        it = cl.generate_stream(long_request(cl, text=LONG_PROMPT * 2), timeout=60)
        it.cancel()
    still_serving(cl)


def t_deadline(d):
    cl = d.client
    before = cl.stats().requests_aborted
    t0 = time.time()
    expect_rpc_error(lambda: list(cl.generate_stream(long_request(cl, request_id="dl"),
                                                     timeout=0.4)),
                     grpc.StatusCode.DEADLINE_EXCEEDED)
    check(time.time() - t0 < 5, "deadline took %.1fs" % (time.time() - t0))
    # the server ends it too (without an Abort from us)
    deadline = time.time() + 15
    while time.time() < deadline and cl.stats().requests_aborted == before:
        time.sleep(0.05)
    check(cl.stats().requests_aborted > before, "the request outlived its deadline")
    check(wait_not_live(cl, "dl"), "the request outlived its deadline")
    # an already-expired deadline
    expect_rpc_error(lambda: list(cl.generate_stream(cl.request(text="Hi", max_tokens=4),
                                                     timeout=0.0001)),
                     grpc.StatusCode.DEADLINE_EXCEEDED)
    still_serving(cl)


# On the CPU backend a row's arithmetic does not depend on the batch, so a request's greedy tokens
# are the same alone and in a batch, exactly. On the GPU the matrix products of a batch of B rows
# may take another cuBLAS algorithm (another summation order) than B=1, so bf16 logits can differ
# in the last bit: there a difference is accepted only where the two candidates are a tie at bf16
# precision in the run alone (top-2 logprob gap at the first differing token within
# TIE_GAP_NATS, the ulp of bf16 logits of magnitude ~16-32 is 0.125; tests/cuda/NOTES.md saw gaps
# of 0-0.06 where greedy bf16 runs diverged), and everything after it is not compared.
TIE_GAP_NATS = 0.25


def mixed_requests(cl, n, prefix):
    """n greedy requests of mixed prompts, policies and sampling options (uncomp with its
    entropy groups from the prompt itself included)."""
    exact = daemon_backend() == "cpu"
    reqs = []
    policies = [None, {"policy": "snapkv", "kv_budget": 24},
                {"policy": "pyramidkv", "kv_budget": 32},
                {"policy": "streamingllm", "kv_budget": 20},
                {"policy": "h2o", "kv_budget": 28}, {"policy": "full"},
                {"policy": "uncomp", "kv_budget": 24, "grouping": "prompt"}]
    for i in range(n):
        kw = dict(text=PROMPTS[i % len(PROMPTS)] + (" " * (i // len(PROMPTS))),
                  request_id="%s-%d" % (prefix, i), max_tokens=8 + 2 * i, temperature=0.0,
                  compression=policies[i % len(policies)])
        if i % 4 == 1:
            kw["stop"] = ["\n\n"]
        if i % 5 == 2 and exact:
            # not on the GPU: the tie test there reads the top-2 gap of the reported logprobs,
            # which are the model's (before penalties), and a penalized choice can be near a tie
            # that they do not show (request 7 at token 13: gap 2.375 unpenalized; equal in fp32)
            kw["repetition_penalty"] = 1.3
        if i % 3 == 0:
            kw["ignore_eos"] = True
        if i % 7 == 3:
            kw["logprobs"] = 1
        if not exact:
            kw["logprobs"] = 2  # the top-2 gap at each token (logprobs change no token)
        reqs.append(cl.request(**kw))
    return reqs


def check_together_equals_alone(addr, reqs):
    """Runs the requests one at a time, then all at once (prompts prefilled in the same steps
    as other requests' decode rows): tokens, text, finish, kept KV and the compression plan's
    checksum must not change (on the GPU: up to a bf16 tie, see TIE_GAP_NATS)."""
    exact = daemon_backend() == "cpu"

    def run(req):
        c = gc.Client(addr)
        try:
            ids, text, comp, gaps = [], "", None, []
            for r in c.generate_stream(req, timeout=90):
                if r.WhichOneof("kind") == "chunk":
                    ids.extend(r.chunk.token_ids)
                    text += r.chunk.text
                    for lp in r.chunk.logprobs:
                        top = list(lp.top_logprobs)
                        gaps.append(top[0] - top[1] if len(top) >= 2 else float("inf"))
                else:
                    comp = r.complete
            return (list(ids), text, comp.finish_reason, comp.usage.completion_tokens,
                    comp.compression.kv_tokens_kept, comp.compression.plan_checksum), gaps
        finally:
            c.close()

    alone = [run(r) for r in reqs]
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(run, reqs))
    ties = []
    for i, ((a, gaps), (t, _)) in enumerate(zip(alone, together)):
        if a == t:
            continue
        k = next((j for j, (x, y) in enumerate(zip(a[0], t[0])) if x != y), None)
        tie = (not exact and k is not None and k < len(gaps) and gaps[k] <= TIE_GAP_NATS and
               a[4:] == t[4:])
        check(tie, "request %d differs when run with %d others:\nalone    %s\ntogether %s%s" %
              (i, len(reqs) - 1, a, t, "" if exact or k is None else
               "\n(first difference at token %d, top-2 gap there %.4f)" %
               (k, gaps[k] if k < len(gaps) else float("nan"))))
        ties.append("request %d at token %d (gap %.4f)" % (i, k, gaps[k]))
    if ties:
        print("  (%s: differences at bf16 ties accepted: %s)" % (daemon_backend(),
                                                                "; ".join(ties)))
    check(any(a[2] == pb.LENGTH for a, _ in alone))


def t_concurrent_equals_alone(d):
    check_together_equals_alone(d.addr, mixed_requests(d.client, 16, "cc"))


def t_tp2_mixed_equals_alone(args):
    """At tp 2, with small prefill steps (a prompt takes several steps, in slices of a few rows
    beside the decode rows; under --schedule prefill-first, several prompts per prefill-only
    step): every greedy stream and plan equals the same request run alone."""
    if args.no_mpi:
        print("  (skipped: --no-mpi)")
        return
    for schedule in ("mixed", "prefill-first"):
        d = Daemon(args, extra=["--tp", "2", "--prefill-step-tokens", "96", "--prefill-chunk",
                                "12", "--schedule", schedule], np=2, name="tp2mix-" + schedule)
        try:
            check(d.wait_serving(timeout=START_TIMEOUT_S * 2)[-1] == gc.SERVING)
            before = step_counts(d.metrics_port)
            check_together_equals_alone(d.addr, mixed_requests(d.client, 8, "mx"))
            n = step_delta(before, step_counts(d.metrics_port))
            if schedule == "mixed":
                check(n["mixed"] > 0, "%s: no mixed step: %s" % (schedule, n))
            else:
                check(n["mixed"] == 0 and n["prefill"] > 0, "%s: %s" % (schedule, n))
        finally:
            d.kill()


# ---- --schedule prefill-first --------------------------------------------------------------

PF_FLAGS = ["--schedule", "prefill-first", "--prefill-step-tokens", "96", "--prefill-chunk", "12"]
STALL_PROMPT = " ".join([LONG_PROMPT] * 3)  # ~360 tokens: 8 steps of 4 x 96 row-layers


def step_counts(port):
    """uncomp:engine_steps_total by kind: {"decode": n, "prefill": n, "mixed": n}."""
    _, v = parse_exposition(scrape(port)[2])
    out = {}
    for k, x in v.items():
        m = re.match(r'uncomp:engine_steps_total\{(?:.*,)?kind="(\w+)"\}$', k)
        if m:
            out[m.group(1)] = x
    check(sorted(out) == ["decode", "mixed", "prefill"], "step kinds: %s" % out)
    return out


def step_delta(before, after):
    return {k: after[k] - before[k] for k in after}


def steps_while_prefilling(d, prefix):
    """A stream decodes (greedy, thousands of tokens); a ~360-token prompt then arrives and
    prefills over several steps. Returns the steps by kind from just before that prompt's
    submission to its Complete, during which the stream is still decoding (checked)."""
    tokens = []
    decoding = threading.Event()
    ended = threading.Event()
    req = d.client.request(text=PROMPTS[0], request_id=prefix + "-dec", max_tokens=3500,
                           temperature=0.0, ignore_eos=True)

    def stream():
        c = gc.Client(d.addr)
        try:
            for r in c.generate_stream(req, timeout=600):
                if r.WhichOneof("kind") == "chunk":
                    tokens.extend(r.chunk.token_ids)
                    if len(tokens) >= 3:
                        decoding.set()
        except grpc.RpcError:
            pass
        finally:
            ended.set()
            c.close()

    th = threading.Thread(target=stream)
    th.start()
    try:
        check(decoding.wait(120), "the stream never started decoding")
        before = step_counts(d.metrics_port)
        _, _, comp, _ = d.client.generate(text=STALL_PROMPT, request_id=prefix + "-long",
                                          max_tokens=1, temperature=0.0)
        after = step_counts(d.metrics_port)
        live = not ended.is_set()
    finally:
        d.client.abort(prefix + "-dec")
        th.join(120)
    check(comp is not None and comp.usage.completion_tokens == 1, "the long prompt: %s" % comp)
    check(live, "the stream ended (%d tokens) before the long prompt was done: the check says "
          "nothing" % len(tokens))
    n = step_delta(before, after)
    print("  steps while the prompt prefilled: %s" % n)
    return n


def t_mixed_steps_while_prefilling(d):
    """--schedule mixed (the default): a stream that decodes gets its row in every step, also
    in the steps that prefill a prompt beside it (so no step is prefill-only)."""
    n = steps_while_prefilling(d, "mixsteps")
    check(n["mixed"] > 0 and n["prefill"] == 0, "steps while a prompt prefilled: %s" % n)


def check_step_trace(path, counts):
    """--step-trace: a JSON line per step that ran, as many of each kind as the metrics counted
    (the last line may land just after the client's Complete), with the summary of
    tests/bench/step_trace.py over it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import step_trace
    for _ in range(50):
        steps = step_trace.load(path)
        got = {k: sum(1 for s in steps if s["kind"] == k and s["ok"]) for k in counts}
        if got == counts:
            break
        time.sleep(0.1)
    check(got == counts, "step trace %s against the metrics %s" % (got, counts))
    for s in steps:
        check(s["engine_ms"] >= 0 and s["idle_ms"] >= 0 and
              (s["kind"] != "decode" or (s["decode"] > 0 and s["prefill"] == 0)) and
              (s["kind"] != "prefill" or (s["prefill"] > 0 and s["prefill_row_layers"] > 0)),
              "step trace line %s" % s)
    text = "\n".join(step_trace.summary(steps, 8))
    check("decode batch" in text and "prefill-only steps" in text, text)
    # the host time of ending and starting sequences, summed up where sequences ended
    check(all(s["free_ms"] >= 0 and s["new_ms"] >= 0 and (s["free"] > 0 or s["free_ms"] < 1)
              for s in steps), "free_ms/new_ms in %s" % steps)
    check(not any(s["free"] > 0 for s in steps) or "frees:" in text, text)
    # a decode step right after a decode step of the same rows, nothing added or freed, finds
    # its blocks taken by the lookahead
    repeat = [b for a, b in zip(steps, steps[1:])
              if a["kind"] == b["kind"] == "decode" and a["decode"] == b["decode"] and
              b["new"] == 0 and b["free"] == 0]
    check(not repeat or any(s.get("lookahead") for s in repeat),
          "no decode step of %d repeating the step before used the lookahead" % len(repeat))


def t_prefill_first(args):
    """--schedule prefill-first: greedy streams of a mixed load equal the same requests run alone
    and no step ever mixes decode rows with prefill; a stream that is decoding gets no token
    while a long prompt prefills (every step of that prefill is prefill-only); a bad --schedule
    is refused at start-up; --step-trace writes a line per step (and a path it cannot write
    fails the start-up with the reason, as one of --send-trace does)."""
    for flags, code, why in (
            (["--step-trace", "/nonexistent-dir/steps.jsonl"], 1,
             "--step-trace /nonexistent-dir/steps.jsonl: No such file"),
            (["--send-trace", "/nonexistent-dir/sends.jsonl"], 1,
             "--send-trace /nonexistent-dir/sends.jsonl: No such file"),
            (["--schedule", "prefill_first"], 2,
             "--schedule=prefill_first must be mixed or prefill-first")):
        bad = subprocess.run([args.daemon, "--model", args.model, "--listen",
                              "127.0.0.1:%d" % free_port(), "--http-listen", "0"] + flags,
                             capture_output=True, text=True, timeout=60)
        check(bad.returncode == code and why in bad.stderr,
              "%s: exit %s: %s" % (flags, bad.returncode, bad.stderr[-1500:]))
    trace = os.path.join(tempfile.mkdtemp(prefix="uncomp_trace_"), "steps.jsonl")
    d = Daemon(args, extra=PF_FLAGS + ["--step-trace", trace], name="prefill-first")
    try:
        check(d.wait_serving()[-1] == gc.SERVING)
        check("\nschedule:prefill-first\n" in d.client.stats().text, "# Config lacks the schedule")
        before = step_counts(d.metrics_port)
        check_together_equals_alone(d.addr, mixed_requests(d.client, 16, "pf"))
        n = step_delta(before, step_counts(d.metrics_port))
        check(n["mixed"] == 0 and n["prefill"] > 0 and n["decode"] > 0,
              "steps of the mixed load: %s" % n)
        check_step_trace(trace, step_counts(d.metrics_port))
        n = steps_while_prefilling(d, "pfsteps")
        # ~360 tokens x 8 layers at 4 x 96 row-layers a step: about 8 prefill-only steps
        check(n["mixed"] == 0 and n["prefill"] >= 2, "steps while a prompt prefilled: %s" % n)
        d.stop_clean(args.asan)
    finally:
        d.kill()


def t_prefill_first_decode_wait(args):
    """--max-decode-wait-ms bounds the stall: with 1 ms, a decoding stream that waited through a
    prefill-only step (each takes several ms: 384 row-layers of an 8-layer, 256-wide model) is
    in the next step, so no two prefill-only steps follow each other while it decodes."""
    d = Daemon(args, extra=PF_FLAGS + ["--max-decode-wait-ms", "1"], name="decode-wait")
    try:
        check(d.wait_serving()[-1] == gc.SERVING)
        n = steps_while_prefilling(d, "waitsteps")
        check(n["mixed"] > 0 and n["prefill"] <= n["mixed"] + 1,
              "steps while a prompt prefilled: %s" % n)
    finally:
        d.kill()


def t_decode_overlap(args):
    """--decode-overlap yes (on the CPU too): greedy streams that decode together, with the next
    step launched before the host has read each step's tokens and taken by the step after it,
    equal the same requests run alone; requests that end, stop or arrive while a step is in
    flight change nothing; the step trace shows the steps taken in flight; a bad value is
    refused at start-up."""
    bad = subprocess.run([args.daemon, "--model", args.model, "--listen",
                          "127.0.0.1:%d" % free_port(), "--http-listen", "0",
                          "--decode-overlap", "sometimes"], capture_output=True, text=True,
                         timeout=60)
    check(bad.returncode == 2 and "--decode-overlap=sometimes must be auto, yes or no" in
          bad.stderr, "exit %s: %s" % (bad.returncode, bad.stderr[-1500:]))
    trace = os.path.join(tempfile.mkdtemp(prefix="uncomp_trace_"), "steps.jsonl")
    d = Daemon(args, extra=["--decode-overlap", "yes", "--step-trace", trace], name="overlap")
    try:
        check(d.wait_serving()[-1] == gc.SERVING)
        reqs = []
        for i in range(6):  # plain greedy: ends by length at different steps, one by a stop
            kw = dict(text=PROMPTS[i % len(PROMPTS)], request_id="ov-%d" % i,
                      max_tokens=12 + 5 * i, temperature=0.0, ignore_eos=i % 2 == 0)
            if i == 3:
                kw["stop"] = ["e"]
            reqs.append(d.client.request(**kw))
        check_together_equals_alone(d.addr, reqs)
        # a request that arrives while the others decode (a step in flight is taken or
        # discarded around its admission)
        check_together_equals_alone(d.addr, mixed_requests(d.client, 8, "ovm"))
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "bench"))
        import step_trace
        steps = step_trace.load(trace)
        taken = sum(1 for s in steps if s.get("overlap"))
        check(taken > 10, "%d steps taken from a step in flight of %d" % (taken, len(steps)))
        check(all(s["kind"] == "decode" for s in steps if s.get("overlap")),
              "a step other than a decode taken from a step in flight")
        d.stop_clean(args.asan)
    finally:
        d.kill()
    # requests that wait for a running one's end (--max-running 2) do not stop the overlap
    trace = os.path.join(tempfile.mkdtemp(prefix="uncomp_trace_"), "steps.jsonl")
    d = Daemon(args, extra=["--decode-overlap", "yes", "--max-running", "2", "--step-trace",
                            trace], name="overlap-queue")
    try:
        check(d.wait_serving()[-1] == gc.SERVING)
        four = [d.client.request(text=PROMPTS[i], request_id="ovq-%d" % i, max_tokens=24,
                                 temperature=0.0, ignore_eos=True) for i in range(4)]
        check_together_equals_alone(d.addr, four)
        # the first pair decodes while the second waits: its steps (two rows, before the first
        # step that frees one of them) are taken in flight
        steps = step_trace.load(trace)
        first = next(i for i, s in enumerate(steps) if s["decode"] == 2)
        end = next(i for i, s in enumerate(steps) if i > first and s["free"] > 0)
        taken = sum(1 for s in steps[first:end] if s.get("overlap"))
        check(taken >= 15, "%d of the first pair's %d steps taken from a step in flight while "
              "two requests waited" % (taken, end - first))
        d.stop_clean()
    finally:
        d.kill()


def t_request_id_reuse(d):
    """A client that has received Complete may reuse the request_id at once (the scheduler must
    retire an id before it emits the DONE event)."""
    cl = d.client
    for i in range(20):
        ids, _, comp, _ = cl.generate(text="Hello", request_id="reuse-me", max_tokens=2,
                                      temperature=0.0)
        check(comp is not None and len(ids) >= 1, "round %d" % i)


def t_bad_inputs(d):
    cl = d.client
    IA = grpc.StatusCode.INVALID_ARGUMENT
    vocab = cl.model_info().vocab_size
    ctx = cl.model_info().context_length
    nan = float("nan")
    cases = [
        (dict(text="hi", temperature=nan), "sampling.temperature"),
        (dict(text="hi", temperature=-1.0), "sampling.temperature"),
        (dict(text="hi", temperature=float("inf")), "sampling.temperature"),
        (dict(text="hi", top_p=1.5), "sampling.top_p=1.5 must be in (0, 1]"),
        (dict(text="hi", top_p=-0.5), "sampling.top_p"),
        (dict(text="hi", top_p=nan), "sampling.top_p"),
        (dict(text="hi", min_p=2.0), "sampling.min_p"),
        (dict(text="hi", repetition_penalty=-1.0), "sampling.repetition_penalty"),
        (dict(text="hi", frequency_penalty=5.0), "sampling.frequency_penalty"),
        (dict(text="hi", presence_penalty=-3.0), "sampling.presence_penalty"),
        (dict(text="hi", logprobs=50), "sampling.logprobs"),
        (dict(text="hi", max_tokens=5, min_tokens=10), "sampling.min_tokens"),
        (dict(text="hi", max_tokens=ctx + 10), "max_tokens"),
        (dict(text="hi", stop=["x"] * 65), "sampling.stop"),
        (dict(text="hi", stop=["a" * 300]), "sampling.stop[0]"),
        (dict(text="hi", stop=["ok", ""]), "sampling.stop[1]"),
        (dict(text="hi", stop_token_ids=[vocab + 5]), "sampling.stop_token_ids[0]"),
        (dict(token_ids=[1, vocab, 2]), "token_ids[1]=%d" % vocab),
        (dict(token_ids=[3] * (ctx + 5)), "context"),
        (dict(text=""), "text"),
        (dict(), "input"),
        (dict(text="hi", compression={"policy": "zip"}), "compression.policy"),
        (dict(text="hi", compression={"policy": "snapkv+h2o"}), "compression.policy"),
        (dict(text="hi", compression={"policy": "snapkv", "think_ratio": 0.5}),
         "compression.think_ratio"),
        (dict(text="hi", compression={"policy": "snapkv", "lorc_ratio": 0.5}),
         "compression.lorc_ratio"),
        (dict(text="hi", compression={"policy": "snapkv+lorc", "decode_mode": "evict"}),
         "compression"),
        (dict(text="hi", compression={"policy": "snapkv", "kv_budget": 2}),
         "compression.kv_budget"),
        (dict(text="hi", compression={"policy": "full", "decode_mode": "later"}),
         "compression.decode_mode"),
        (dict(text="hi", compression={"grouping": "random"}), "compression.grouping"),
        (dict(text="hi", compression={"window": 100}), "compression.window"),
        (dict(text="hi", compression={"pool_kernel": 4}), "compression.pool_kernel"),
        (dict(text="hi", compression={"policy": "uncomp-stage", "stage_starts": [5, 3]}),
         "compression.stage_starts"),
        (dict(text="hi", request_id="x" * 100), "request_id"),
        (dict(text="hi", request_id="has space"), "request_id"),
    ]
    for kw, field in cases:
        req = cl.request(**kw)
        expect_rpc_error(lambda: list(cl.generate_stream(req, timeout=10)), IA, field)
    # empty token_ids: an explicitly set but empty oneof member
    req = pb.GenerateRequest()
    req.token_ids.SetInParent()
    expect_rpc_error(lambda: list(cl.generate_stream(req, timeout=10)), IA, "token_ids")
    # budget 0 means the default: fine with a policy that needs one
    _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=3, temperature=0.0,
                                compression={"policy": "snapkv", "kv_budget": 0})
    check(comp.compression.policy == "snapkv" and comp.compression.kv_budget > 0)
    # other services
    expect_rpc_error(lambda: cl.detokenize([0, vocab + 1]), IA, "token_ids[1]")
    expect_rpc_error(lambda: cl.abort(""), IA, "request_id")
    expect_rpc_error(lambda: cl.stats("nosuch"), IA, "section")
    expect_rpc_error(lambda: cl.raw_unary("/uncomp.v1.Inference/Tokenize", b"\x0a\x02\xff\xfe"),
                     IA, "UTF-8")
    # invalid UTF-8 in a Generate text
    expect_rpc_error(lambda: cl.raw_stream("/uncomp.v1.Inference/Generate",
                                           b"\x12\x03a\xc3\x28"), IA, "UTF-8")
    still_serving(cl)


def t_malformed_protobuf(d):
    cl = d.client
    IA = grpc.StatusCode.INVALID_ARGUMENT
    for raw in (b"\xff\xff\xff\xff", b"\x12\x10abc", b"\x0a", b"\x22\x05\x08"):
        expect_rpc_error(lambda: cl.raw_stream("/uncomp.v1.Inference/Generate", raw), IA,
                         "GenerateRequest")
        expect_rpc_error(lambda: cl.raw_unary("/uncomp.v1.Inference/Tokenize", raw), IA,
                         "TokenizeRequest")
        expect_rpc_error(lambda: cl.raw_unary("/uncomp.v1.Admin/GetStats", raw), IA)
    expect_rpc_error(lambda: cl.raw_unary("/uncomp.v1.Admin/NoSuchMethod", b""),
                     grpc.StatusCode.UNIMPLEMENTED, "NoSuchMethod")
    # an empty message is a valid (all-default) message; Generate rejects it for its fields
    expect_rpc_error(lambda: cl.raw_stream("/uncomp.v1.Inference/Generate", b""), IA, "input")
    still_serving(cl)


def t_chaos(d):
    """Random client behaviour from 10 threads for a few seconds: streams cancelled at random
    points, channels dropped mid-stream, garbage, aborts, watches. The daemon must survive,
    end every request and keep serving."""
    import random
    stop_at = time.time() + 6
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        while time.time() < stop_at:
            c = gc.Client(d.addr, timeout=20)
            try:
                act = rnd.randrange(6)
                if act <= 1:
                    rid = "chaos-%d-%d" % (seed, rnd.randrange(1 << 30))
                    it = c.generate_stream(c.request(text=rnd.choice(PROMPTS), request_id=rid,
                                                     max_tokens=rnd.randrange(1, 40),
                                                     temperature=rnd.choice([0.0, 0.8]),
                                                     seed=seed, ignore_eos=True))
                    for k, _ in enumerate(it):
                        if k == rnd.randrange(4):
                            if act == 0:
                                it.cancel()
                            break
                elif act == 2:
                    try:
                        junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 12)))
                        c.raw_stream("/uncomp.v1.Inference/Generate", junk)
                    except grpc.RpcError as e:
                        if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT,):
                            errors.append("garbage -> %s %s" % (e.code(), e.details()))
                elif act == 3:
                    c.abort("chaos-%d-%d" % (rnd.randrange(10), rnd.randrange(1 << 30)))
                    c.tokenize(rnd.choice(PROMPTS))
                elif act == 4:
                    w = c.watch(timeout=5)
                    next(w)
                    w.cancel()
                else:
                    c.stats()
                    c.server_info()
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.CANCELLED,):
                    errors.append("%s: %s" % (e.code(), e.details()))
            finally:
                c.close()  # drops the connection, possibly mid-stream

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    check(not errors, "unexpected errors: %s" % errors[:5])
    cl = d.client
    deadline = time.time() + 20
    while time.time() < deadline:
        si = cl.server_info()
        if si.running_requests == 0 and si.queued_requests == 0:
            break
        time.sleep(0.1)
    si = cl.server_info()
    check(si.running_requests == 0 and si.queued_requests == 0,
          "requests left behind: running=%d queued=%d" % (si.running_requests,
                                                          si.queued_requests))
    st = cl.stats()
    check(st.requests_total == st.requests_finished,
          "every accepted request must have finished: total=%d finished=%d" %
          (st.requests_total, st.requests_finished))
    still_serving(cl)


SAMPLE_RE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})?'
    r' (NaN|[+-]Inf|[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)( -?[0-9]+)?$')
HELP_RE = re.compile(r'^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .*$')
TYPE_RE = re.compile(r'^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) '
                     r'(counter|gauge|histogram|summary|untyped)$')


def parse_exposition(text):
    """Checks every line; returns ({family: type}, {series: value})."""
    types, values = {}, {}
    for n, line in enumerate(text.split("\n"), 1):
        if line == "":
            continue
        if line.startswith("# HELP"):
            check(HELP_RE.match(line), "line %d: bad HELP: %r" % (n, line))
            continue
        if line.startswith("# TYPE"):
            m = TYPE_RE.match(line)
            check(m, "line %d: bad TYPE: %r" % (n, line))
            check(m.group(1) not in types, "line %d: TYPE %s twice" % (n, m.group(1)))
            types[m.group(1)] = m.group(2)
            continue
        check(not line.startswith("#"), "line %d: stray comment %r" % (n, line))
        m = SAMPLE_RE.match(line)
        check(m, "line %d: not a valid sample line: %r" % (n, line))
        name = m.group(1)
        fam = re.sub(r"_(bucket|sum|count)$", "", name)
        check(name in types or fam in types, "line %d: %s has no TYPE" % (n, name))
        values[name + (m.group(2) or "")] = float(m.group(3))
    return types, values


def served_model_name(d):
    """The model_name label the daemon should use: --served-model-name, else the model folder's
    base name."""
    if "--served-model-name" in d.cmd:
        return d.cmd[d.cmd.index("--served-model-name") + 1]
    return os.path.basename(os.path.normpath(d.args.model))


def check_model_label(body, name):
    """Every sample carries model_name="name" (escaped), first among its labels, as vLLM's."""
    esc = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    label = 'model_name="%s"' % esc
    samples = [line for line in body.split("\n") if line and not line.startswith("#")]
    check(samples, "no samples")
    for line in samples:
        check(re.match(r'^[a-zA-Z_:][a-zA-Z0-9_:]*\{' + re.escape(label) + r'[,}]', line),
              "sample without %s: %r" % (label, line))
    return label


def t_metrics(d):
    cl = d.client
    cl.generate(text=PROMPTS[1], max_tokens=6, temperature=0.0)
    cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                compression={"policy": "snapkv", "kv_budget": 16})
    status, ctype, body = scrape(d.metrics_port)
    check(status == 200 and ctype.startswith("text/plain"), "%s %s" % (status, ctype))
    types, v = parse_exposition(body)
    # every series is labelled with the served model name (vLLM's vllm:...{model_name="..."})
    mn = check_model_label(body, served_model_name(d))
    v = {re.sub(r"\{" + re.escape(mn) + r"\}$", "", k).replace("{" + mn + ",", "{"): x
         for k, x in v.items()}
    for fam, typ in [("uncomp:num_requests_running", "gauge"),
                     ("uncomp:num_requests_waiting", "gauge"),
                     ("uncomp:kv_cache_usage_perc", "gauge"),
                     ("uncomp:prompt_tokens_total", "counter"),
                     ("uncomp:generation_tokens_total", "counter"),
                     ("uncomp:request_success_total", "counter"),
                     ("uncomp:time_to_first_token_seconds", "histogram"),
                     ("uncomp:inter_token_latency_seconds", "histogram"),
                     ("uncomp:e2e_request_latency_seconds", "histogram"),
                     ("uncomp:request_queue_time_seconds", "histogram"),
                     ("uncomp:grpc_send_lag_seconds", "histogram"),
                     ("uncomp:kv_tokens_kept_total", "counter"),
                     ("uncomp:kv_tokens_full_total", "counter"),
                     ("uncomp:compression_seconds", "counter"),
                     ("uncomp:prefill_rows_dropped_total", "counter"),
                     ("uncomp:engine_steps_total", "counter")]:
        check(types.get(fam) == typ, "%s: type %s, want %s" % (fam, types.get(fam), typ))
    check(v["uncomp:prompt_tokens_total"] > 0 and v["uncomp:generation_tokens_total"] >= 10)
    check(v["uncomp:request_success_total"] >= 2)
    check(v['uncomp:kv_tokens_kept_total{policy="snapkv"}'] <
          v['uncomp:kv_tokens_full_total{policy="snapkv"}'], "snapkv series")
    check('uncomp:compression_seconds{policy="snapkv"}' in v)
    check('uncomp:prefill_rows_dropped_total{policy="uncomp-stage"}' in v)
    # histograms: cumulative buckets, +Inf == count
    # each streamed chunk's oldest token, from its emission to gRPC taking the message: stamped
    # (an unset stamp would read as decades) and quick on an idle daemon
    lag = "uncomp:grpc_send_lag_seconds"
    check(0 <= v[lag + "_sum"] / max(v[lag + "_count"], 1) < 1.0, "send lag %r" % v[lag + "_sum"])
    for h in ("uncomp:time_to_first_token_seconds", "uncomp:e2e_request_latency_seconds", lag):
        buckets = [(k, x) for k, x in v.items() if k.startswith(h + "_bucket")]
        counts = [x for _, x in buckets]
        check(counts == sorted(counts), "%s buckets not cumulative" % h)
        check(v[h + '_bucket{le="+Inf"}'] == v[h + "_count"] >= 2, "%s count" % h)
    check(scrape_code(d.metrics_port, "/") == 404 and scrape_code(d.metrics_port, "/x") == 404)


def scrape_code(port, path):
    try:
        return scrape(port, path)[0]
    except urllib.error.HTTPError as e:
        return e.code


def t_admin(d):
    cl = d.client
    si = cl.server_info()
    check(si.state == "SERVING" and si.tp_size == d.np and len(si.ranks) == d.np, str(si))
    check(si.version and si.backend == daemon_backend() and si.uptime_s >= 0 and
          si.default_policy, str(si))
    check(all(r.host and r.weight_bytes > 0 for r in si.ranks), str(si))
    mi = cl.model_info()
    check(mi.layers == 8 and mi.heads == 8 and mi.kv_heads == 4 and mi.head_dim == 32, str(mi))
    check(mi.vocab_size == 4096 and mi.context_length == 4096 and mi.architecture, str(mi))
    check(mi.tokenizer.startswith("bpe") and len(mi.eos_token_ids) >= 1, str(mi))
    cl.generate(text="Hi there", max_tokens=3, temperature=0.0)
    st = cl.stats()
    check(st.requests_total >= 1 and st.requests_finished >= 1 and st.generation_tokens_total >= 3)
    check(st.ttft_ms.count >= 1 and st.ttft_ms.p50 > 0 and st.e2e_ms.p99 >= st.e2e_ms.p50)
    sections = re.findall(r"^# (\w+)$", st.text, re.M)
    check(sections == ["Server", "Cluster", "Model", "Memory", "KV", "Compress", "Requests",
                       "Errors", "Config"], "sections %s" % sections)
    for line in st.text.split("\n"):
        check(line == "" or line.startswith("# ") or re.match(r"^[\w.\-]+:.*$", line),
              "INFO line %r" % line)
    check(re.search(r"^tp_size:%d$" % d.np, st.text, re.M), "tp_size line")
    check(re.search(r"^state:SERVING$", st.text, re.M))
    one = cl.stats("kv").text
    check(one.startswith("# KV\n") and "# Server" not in one, one)
    check(cl.stats("COMPRESS").text.startswith("# Compress"))
    check("listen" in cl.stats("Config").text, "Config section from write_config_info")
    # SetCompressionPolicy: validated, applies to new requests
    IA = grpc.StatusCode.INVALID_ARGUMENT
    expect_rpc_error(lambda: cl.set_policy(policy="nonsense"), IA, "policy")
    expect_rpc_error(lambda: cl.set_policy(policy="snapkv", kv_budget=3), IA, "kv_budget")
    expect_rpc_error(lambda: cl.set_policy(decode_mode="x"), IA, "decode_mode")
    old = cl.server_info()
    r = cl.set_policy(policy="snapkv", kv_budget=20)
    check(r.policy == "snapkv" and r.kv_budget == 20, str(r))
    check(cl.server_info().default_policy == "snapkv")
    _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=2, temperature=0.0)
    check(comp.compression.policy == "snapkv" and comp.compression.kv_budget == 20)
    cl.set_policy(policy=old.default_policy, kv_budget=old.default_kv_budget)
    check(cl.server_info().default_policy == old.default_policy)
    # Calibrate on given text, then the profile is there and uncomp runs
    expect_rpc_error(lambda: cl.calibrate(text="too short"), IA, "short")
    calib = " ".join(PROMPTS) * 8
    prof = cl.calibrate(text=calib, window_tokens=256, max_windows=2)
    check(prof.present and len(prof.layers) == 8 and prof.head_groups >= 1, "profile")
    check(all(len(l.kv_head_group) == 4 and len(l.head_entropy) == 8 for l in prof.layers))
    check(prof.json.startswith("{") and prof.calib_tokens > 0)
    p2 = cl.profile()
    check(p2.present and p2.json == prof.json and len(p2.layers) == 8)
    _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                                compression={"policy": "uncomp", "kv_budget": 24})
    check(comp.compression.policy == "uncomp" and comp.compression.groups,
          "uncomp report %s" % comp.compression)
    check(comp.compression.kv_tokens_kept < comp.compression.kv_tokens_full)
    # issue 15: the calibration found KVSharer's layer pairs (every rank the same: the profile
    # is rank 0's, the engine checks the plan checksum); snapkv+kvsharer per request names them
    pj = json.loads(prof.json)
    check("kvsharer" in pj and len(pj["kvsharer"]["pairs"]) >= 1, "kvsharer pairs in %s" % pj)
    nsh = len(pj["kvsharer"]["pairs"])
    _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                                compression={"policy": "snapkv+kvsharer", "kv_budget": 24})
    c = comp.compression
    check(c.policy == "snapkv+kvsharer" and c.shared_layers == nsh, "kvsharer report %s" % c)
    _, _, comp2, _ = cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                                 compression={"policy": "snapkv", "kv_budget": 24})
    check(c.kv_tokens_kept * 8 == comp2.compression.kv_tokens_kept * (8 - nsh),
          "kvsharer keeps %d tokens, snapkv %d" % (c.kv_tokens_kept,
                                                    comp2.compression.kv_tokens_kept))
    expect_rpc_error(lambda: cl.generate(text="Hi", max_tokens=1,
                                         compression={"policy": "uncomp-stage+kvsharer"}),
                     IA, "does not combine")
    # ... and MiniCache's merge set: 7 adjacent-layer distances, the paper's count of 2 pairs,
    # which a minicache request merges unless it names a start
    mc = pj.get("minicache", {})
    check(len(mc.get("distances", [])) == 7 and mc.get("n_pairs") == 2 and
          len(mc.get("pairs", [])) == 2, "minicache pairs in %s" % pj)
    want = [p[0] for p in mc.get("pairs", [])]
    _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                                compression={"policy": "snapkv+minicache", "kv_budget": 24})
    c = comp.compression
    check(list(c.minicache_layers) == want and c.minicache_start == want[0],
          "minicache report %s, profile pairs %s" % (c, want))
    _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                                compression={"policy": "snapkv+minicache", "kv_budget": 24,
                                             "minicache_start": 2})
    c = comp.compression
    check(list(c.minicache_layers) == [2, 4, 6] and c.minicache_start == 2,
          "minicache_start=2 report %s" % c)


def t_second_daemon_same_port(d):
    args = d.args
    cmd = [args.daemon, "--model", args.model, "--listen", d.addr, "--log-level", "warn"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    check(p.returncode != 0, "a second daemon started on the same port")
    check(d.addr in p.stderr, "message: %s" % p.stderr[-2000:])
    # the same for the metrics port
    cmd = [args.daemon, "--model", args.model, "--listen", "127.0.0.1:%d" % free_port(),
           "--metrics-port", str(d.metrics_port), "--log-level", "warn"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    check(p.returncode != 0, "a second daemon started on the same metrics port")
    check(str(d.metrics_port) in p.stderr, "message: %s" % p.stderr[-2000:])
    still_serving(d.client)
    check(scrape(d.metrics_port)[0] == 200)


def t_drain(d):
    """Last on the main daemon: a stream in flight finishes, health turns NOT_SERVING, exit 0."""
    cl = d.client
    watch = cl.watch(timeout=60)
    check(next(watch).status == gc.SERVING)
    # long enough to be in flight while the drain starts and a new request is refused, also on a
    # loaded machine where the Watch update reaches this client late (a GPU decodes the tiny
    # model's 120 tokens in well under 0.1 s; 2 CPU ranks, each with half the work, decoded 600
    # in 1.35 s and once finished before the refused request was sent, under ctest -j2:
    # tests/mpi/test_tp_netns.sh runs this at tp 2)
    n_tok = (400 if d.np == 1 else 2000) if daemon_backend() == "cpu" else 2000
    it = cl.generate_stream(long_request(cl, max_tokens=n_tok, request_id="drain-me"), timeout=60)
    next(it)
    res = {}

    def drain():
        c = gc.Client(d.addr)
        try:
            res["drain"] = c.drain(timeout_ms=30000)
        except grpc.RpcError as e:
            res["err"] = e
        finally:
            c.close()

    th = threading.Thread(target=drain)
    th.start()
    check(next(watch).status == gc.NOT_SERVING, "Watch did not report NOT_SERVING")
    # new work is refused while draining
    time.sleep(0.1)
    try:
        expect_rpc_error(lambda: list(cl.generate_stream(cl.request(text="x", max_tokens=2))),
                         grpc.StatusCode.UNAVAILABLE, "draining")
    except TestFailure as e:
        # say what the daemon did (had it drained and stopped already?)
        raise TestFailure("%s\ndaemon log:\n%s" % (e, d.tail()))
    rest = list(it)
    comp = rest[-1].complete
    check(comp.finish_reason == pb.LENGTH and comp.usage.completion_tokens == n_tok,
          "the in-flight request did not finish: %s" % comp)
    th.join(60)
    check("drain" in res, "Drain failed: %s" % res.get("err"))
    check(res["drain"].finished == 1 and res["drain"].aborted == 0, str(res["drain"]))
    code = d.stop(sig=None, timeout=30)
    check(d.exit_ok(code), "exit code %s after Drain:\n%s" % (code, d.tail()))


# ---------------------------------------------------------------------------------------------
# other daemons
# ---------------------------------------------------------------------------------------------

CHATML = os.path.join(REPO, "tests", "conformance", "chat_templates", "chatml.jinja")


def t_grpc_chat(args):
    """Inference.Chat renders with the template (as HTTP chat does) and streams as Generate."""
    d = Daemon(args, ["--chat-template", CHATML, "--served-model-name", 'chat "model" \\ 1'],
               name="chat")
    try:
        d.wait_serving()
        cl = d.client
        conv = [("system", "You are brief."), ("user", "Tell me a story"),
                ("assistant", "Once upon a time"), ("user", "Go on")]
        rendered = "".join("<|im_start|>%s\n%s<|im_end|>\n" % m for m in conv)
        rendered += "<|im_start|>assistant\n"
        # --served-model-name names the model_name label of the metrics (escaped)
        check_model_label(scrape(d.metrics_port)[2], 'chat "model" \\ 1')
        ids = list(cl.tokenize(rendered, add_special_tokens=False).token_ids)
        want, _, wc, _ = cl.generate(token_ids=ids, max_tokens=12, temperature=0.0,
                                     ignore_eos=True)
        got, text, comp = [], "", None
        for r in cl.chat(conv, max_tokens=12, temperature=0.0, ignore_eos=True):
            if r.WhichOneof("kind") == "chunk":
                got.extend(r.chunk.token_ids)
                text += r.chunk.text
            else:
                comp = r.complete
        check(got == want, "Chat %s != Generate of the rendered prompt %s" % (got, want))
        check(comp.usage.prompt_tokens == len(ids), "usage %s" % comp.usage)
        # n = 2 and stop strings (Generate's parsing of sampling)
        done = [r.complete.index for r in cl.chat(conv, n=2, max_tokens=4, temperature=0.0)
                if r.WhichOneof("kind") == "complete"]
        check(sorted(done) == [0, 1], "n=2 Completes %s" % done)
        expect_rpc_error(lambda: cl.chat([("wizard", "hi")], max_tokens=2),
                         grpc.StatusCode.INVALID_ARGUMENT, "role")
        expect_rpc_error(lambda: cl.chat([], max_tokens=2),
                         grpc.StatusCode.INVALID_ARGUMENT, "messages")
    finally:
        d.stop()
        d.kill()


def t_chat_without_template(d):
    expect_rpc_error(lambda: d.client.chat([("user", "hi")], max_tokens=2),
                     grpc.StatusCode.FAILED_PRECONDITION, "--chat-template")


def t_queue_full(args):
    d = Daemon(args, ["--max-queued-requests", "1", "--max-running", "1"], name="queue")
    try:
        d.wait_serving()
        cl = d.client
        a = cl.generate_stream(long_request(cl, request_id="qa"), timeout=60)
        next(a)  # running
        b = cl.generate_stream(long_request(cl, request_id="qb"), timeout=60)
        deadline = time.time() + 10
        while time.time() < deadline and cl.server_info().queued_requests < 1:
            time.sleep(0.02)
        check(cl.server_info().queued_requests == 1, "qb is not queued")
        expect_rpc_error(lambda: list(cl.generate_stream(cl.request(text="c", max_tokens=2))),
                         grpc.StatusCode.RESOURCE_EXHAUSTED, "queue")
        check(cl.abort("qb") and cl.abort("qa"))
        for s in (a, b):
            rest = list(s)
            check(rest[-1].complete.finish_reason == pb.ABORTED)
        check(cl.stats().requests_rejected >= 1)
        still_serving(cl)
        d.stop_clean(args.asan)
    finally:
        d.kill()


def t_tp2_sigterm_mid_stream(args):
    if args.no_mpi:
        print("  (skipped: --no-mpi)")
        return
    d = Daemon(args, np=2, name="tp2")
    try:
        seen = d.wait_serving(timeout=START_TIMEOUT_S * 2)
        check(seen[-1] == gc.SERVING)
        cl = d.client
        si = cl.server_info()
        check(si.tp_size == 2 and len(si.ranks) == 2, str(si))
        ids, text, comp, _ = cl.generate(text=PROMPTS[0], max_tokens=16, temperature=0.0)
        check(comp.usage.completion_tokens > 0 and comp.finish_reason in (pb.LENGTH, pb.STOP))
        _, _, comp, _ = cl.generate(text=LONG_PROMPT, max_tokens=4, temperature=0.0,
                                    compression={"policy": "snapkv", "kv_budget": 16})
        check(comp.compression.kv_tokens_kept < comp.compression.kv_tokens_full)
        st = cl.stats()
        check(re.search(r"^r1_host:", st.text, re.M), "rank 1 in # Cluster")
        watch = cl.watch(timeout=60)
        check(next(watch).status == gc.SERVING)
        it = cl.generate_stream(long_request(cl, max_tokens=200, request_id="term"), timeout=60)
        next(it)
        os.kill(d.rank0_pid(), signal.SIGTERM)
        check(next(watch).status == gc.NOT_SERVING, "Watch did not report NOT_SERVING")
        rest = list(it)
        comp = rest[-1].complete
        check(comp.finish_reason == pb.LENGTH and comp.usage.completion_tokens == 200,
              "SIGTERM cut the stream: %s" % comp)
        code = d.stop(sig=None, timeout=60)
        check(d.exit_ok(code), "mpirun exit code %s:\n%s" % (code, d.tail()))
        if args.asan:
            d.check_asan()
    finally:
        d.kill()


def t_single_sigterm_idle(args):
    """SIGTERM with nothing running: exit 0 quickly; a second SIGTERM is harmless."""
    d = Daemon(args, name="term1")
    try:
        d.wait_serving()
        t0 = time.time()
        code = d.stop(timeout=30)
        check(d.exit_ok(code), "exit code %s:\n%s" % (code, d.tail()))
        check(time.time() - t0 < 10, "exit took %.1fs" % (time.time() - t0))
        if args.asan:
            d.check_asan()
    finally:
        d.kill()


def t_oneshot_prompt_file_nul(args):
    """One-shot mode reads --prompt-file as bytes with a length: a NUL is prompt text (the
    prompt used to be cut at it, so "abc\\0def ghi" was the prompt "abc")."""
    tmp = tempfile.mkdtemp(prefix="uncomp_oneshot_")
    counts = []
    try:
        for text in (b"abc", b"abc\0def ghi"):
            path = os.path.join(tmp, "prompt.txt")
            with open(path, "wb") as f:
                f.write(text)
            p = subprocess.run([args.daemon, "--model", args.model, "--prompt-file", path,
                                "--max-tokens", "2", "--temperature", "0", "--report"],
                               capture_output=True, text=True, timeout=120)
            check(p.returncode == 0 or (args.asan and p.returncode == 66), p.stderr[-1500:])
            m = re.search(r"prompt_tokens=(\d+)", p.stderr)
            check(m, p.stderr[-1500:])
            counts.append(int(m.group(1)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check(counts[1] > counts[0] + 1, "the prompt file was cut at its NUL: %s tokens" % counts)


def t_version(args):
    p = subprocess.run([args.daemon, "--version"], capture_output=True, text=True, timeout=30)
    check(p.returncode == 0 and re.match(r"^uncompd \d+\.\d+\.\d+\n$", p.stdout),
          "--version: %r %r" % (p.returncode, p.stdout))
    p = subprocess.run([args.daemon, "--help"], capture_output=True, text=True, timeout=30)
    check(p.returncode == 0 and "--version" in p.stdout, "--help lists --version")


def t_tls(args):
    """--tls-cert/--tls-key: a TLS client works, a plaintext client does not."""
    tmp = tempfile.mkdtemp(prefix="uncomp_tls_")
    key, cert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       capture_output=True, timeout=60)
    if p.returncode != 0:
        print("  (skipped: openssl cannot make a certificate)")
        return
    root = open(cert, "rb").read()
    d = Daemon(args, ["--tls-cert", cert, "--tls-key", key], name="tls", root_cert=root)
    try:
        d.wait_serving()
        cl = d.client
        check(cl.check() == gc.SERVING)
        check(len(cl.tokenize("Hello TLS").token_ids) > 0)
        _, _, comp, _ = cl.generate(text="Hello", max_tokens=3, temperature=0.0)
        check(comp.usage.completion_tokens == 3)
        plain = gc.Client(d.addr, timeout=3.0)
        expect_rpc_error(lambda: plain.check(), grpc.StatusCode.UNAVAILABLE)
        plain.close()
        d.stop_clean(args.asan)
    finally:
        d.kill()
    # a key file that does not exist: a clear start-up error, exit non-zero
    bad = subprocess.run([args.daemon, "--model", args.model, "--listen",
                          "127.0.0.1:%d" % free_port(), "--tls-cert", cert, "--tls-key",
                          os.path.join(tmp, "missing.pem")], capture_output=True, text=True,
                         timeout=60)
    check(bad.returncode != 0 and "missing.pem" in bad.stderr, bad.stderr[-1500:])


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------

MAIN_TESTS = [t_health_and_watch, t_generate_stream, t_tokenize_roundtrip, t_stop_string_with_nul,
              t_abort_by_id,
              t_client_cancel, t_deadline, t_request_id_reuse, t_bad_inputs,
              t_malformed_protobuf,
              t_concurrent_equals_alone, t_n_choices_fork, t_chat_without_template, t_chaos, t_metrics, t_admin, t_second_daemon_same_port,
              t_mixed_steps_while_prefilling, t_drain]
OTHER_TESTS = [t_version, t_grpc_chat, t_queue_full, t_n_choices_shared_kv,
               t_single_sigterm_idle, t_oneshot_prompt_file_nul, t_tls, t_tp2_sigterm_mid_stream,
               t_tp2_mixed_equals_alone, t_prefill_first, t_prefill_first_decode_wait,
               t_decode_overlap]


class Runner:
    def __init__(self, only, timeout_s):
        self.only = only
        self.timeout_s = timeout_s
        self.failed = []
        self.passed = 0

    def want(self, fn):
        return not self.only or any(o in fn.__name__ for o in self.only)

    def run(self, fn, arg, on_timeout):
        name = fn.__name__[2:]
        print("[ RUN      ] %s" % name, flush=True)
        t0 = time.time()
        timer = threading.Timer(self.timeout_s, on_timeout)
        timer.start()
        try:
            fn(arg)
            print("[       OK ] %s (%.1fs)" % (name, time.time() - t0), flush=True)
            self.passed += 1
            return True
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            timed_out = time.time() - t0 >= self.timeout_s
            print("[  FAILED  ] %s (%.1fs)%s: %s" % (name, time.time() - t0,
                                                   " TIMEOUT" if timed_out else "", e),
                  flush=True)
            if not isinstance(e, TestFailure):
                traceback.print_exc()
            self.failed.append(name)
            return False
        finally:
            timer.cancel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", default=os.environ.get(
        "UNCOMPD", os.path.join(REPO, "build", "daemon", "uncompd")))
    ap.add_argument("--model", default=os.environ.get(
        "UNCOMP_TEST_MODEL", os.path.join(REPO, "..", "shared", "models", "uncomp-tiny")))
    ap.add_argument("--mpirun", default=os.environ.get("MPIRUN", "mpirun"))
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--no-mpi", action="store_true")
    ap.add_argument("--main-np", type=int, default=int(os.environ.get("UC_E2E_MAIN_NP", "1")),
                    help="ranks (= tp) of the daemon the main tests share")
    ap.add_argument("--asan", action="store_true",
                    help="the daemon is an ASan build: fail on any sanitizer report")
    ap.add_argument("daemon_pos", nargs="?")
    args = ap.parse_args()
    if args.daemon_pos:
        args.daemon = args.daemon_pos
    args.daemon = os.path.abspath(args.daemon)
    if not os.access(args.daemon, os.X_OK):
        print("uncompd not found at %s" % args.daemon)
        return 77
    if not os.path.exists(os.path.join(args.model, "config.json")):
        print("model fixture missing: %s" % args.model)
        return 1
    r = Runner(args.only, TEST_TIMEOUT_S * (3 if args.asan else 1))
    t_start = time.time()
    main_tests = [t for t in MAIN_TESTS if r.want(t)]
    if main_tests:
        d = Daemon(args, name="main", np=args.main_np)
        try:
            seen = d.wait_serving(START_TIMEOUT_S * (2 if args.main_np > 1 else 1))
            print("daemon %s up (health %s)" % (d.addr, seen), flush=True)
            # LOADING shows as NOT_SERVING (when a poll catches it), then SERVING
            if seen[-1] != gc.SERVING or any(x != gc.NOT_SERVING for x in seen[:-1]):
                print("[  FAILED  ] health during start-up: %s" % seen)
                r.failed.append("startup_health")
            for t in main_tests:
                if d.proc.poll() is not None:
                    print("[  FAILED  ] %s: the daemon died (exit %s):\n%s" %
                          (t.__name__[2:], d.proc.returncode, d.tail()), flush=True)
                    r.failed.append(t.__name__[2:])
                    continue
                r.run(t, d, on_timeout=d.kill)
            if d.proc.poll() is None:
                code = d.stop()
                if not d.exit_ok(code):
                    print("[  FAILED  ] main daemon exit code %s:\n%s" % (code, d.tail()))
                    r.failed.append("main_exit")
            if args.asan:
                try:
                    d.check_asan()
                except TestFailure as e:
                    print("[  FAILED  ] asan (main daemon): %s" % e)
                    r.failed.append("asan_main")
        finally:
            d.kill()
    for t in OTHER_TESTS:
        if r.want(t):
            r.run(t, args, on_timeout=lambda: None)
    print("==== %d passed, %d failed (%.1fs)%s" % (r.passed, len(r.failed), time.time() - t_start,
                                                  (": " + ", ".join(r.failed)) if r.failed
                                                  else ""))
    return min(len(r.failed), 76)


if __name__ == "__main__":
    sys.exit(main())

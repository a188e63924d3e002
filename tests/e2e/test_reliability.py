"""Reliability end-to-end tests (issue 17): what a hostile client or a careless operator can do to
a running uncompd, each case a test that failed before its fix.

    /usr/bin/python3 tests/e2e/test_reliability.py [--daemon build/daemon/uncompd] [--model DIR]
                                                   [--only SUBSTRING] [--asan]

  calibrate_limits     Admin.Calibrate may ask less than the server's limits, not more (windows,
                       window tokens, text bytes): INVALID_ARGUMENT naming the limit
  calibrate_ttft       during a maximal Calibrate a Generate's median time to first token stays
                       within 2x of an idle twin daemon's (1024- and 4096-token windows)
  calibrate_cancel     a Calibrate whose client goes away (cancel or deadline) ends at once, and a
                       second one then starts (one at a time: the second waits)
  calibrate_drain      SIGTERM during a Calibrate: the calibration ends (UNAVAILABLE), the daemon
                       exits within --drain-timeout
  calibrate_prefill_memory  a prompt whose prefill buffers do not fit beside the calibration
                       window being prefilled (--prefill-memory) waits for that window, then runs
                       (it used to stop both for good: the window gave way to the prompt, the
                       prompt to the window's buffers)
  client_ub            sink_tokens 2^31-1 is refused by its range (no overflow); sampled and
                       greedy requests whose first token has no text
  nan_weights          a model with a NaN weight: every request ends with INTERNAL, the log names
                       the layer
  overflow_named       finite weights whose activations overflow at one layer (in every head, or
                       in one rank's heads only): at tp 1 and 2 every request ends with INTERNAL
                       naming that layer, and so does the log
  metrics_idle_conns   200 idle connections (and one trickling a header) do not starve a scrape
  info_no_paths        GetModelInfo and GetCompressionProfile carry no absolute server paths

Exits with the number of failures (77 when the daemon binary is missing).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402

import grpc_client as gc  # noqa: E402
from e2e_util import TestFailure, check, free_port  # noqa: E402
from test_e2e import Daemon, Runner, expect_rpc_error, scrape  # noqa: E402

IA = grpc.StatusCode.INVALID_ARGUMENT
REPO = gc.REPO
CALIB_TEXT = os.path.join(REPO, "models", "uncomp-tiny", "calibration.txt")


def calib_text(n_bytes):
    base = open(CALIB_TEXT, encoding="utf-8").read()
    return (base * (n_bytes // len(base) + 1))[:n_bytes].rsplit(" ", 1)[0]


def ttft(cl, prompt="Once upon a time there was", timeout=60.0):
    """Seconds from sending a Generate to its first token."""
    req = cl.request(text=prompt, max_tokens=2, temperature=0.0)
    t0 = time.time()
    for m in cl.generate_stream(req, timeout=timeout):
        if m.HasField("chunk") and len(m.chunk.token_ids) > 0:
            return time.time() - t0
    raise TestFailure("no token streamed")


def start(args, extra=(), np=1, name="rel", model=None):
    a = argparse.Namespace(**vars(args))
    if model:
        a.model = model
    d = Daemon(a, list(extra), np=np, name=name)
    d.wait_serving()
    return d


def finish(args, d):
    code = d.stop()
    check(d.exit_ok(code), "exit code %s:\n%s" % (code, d.tail()))
    if args.asan:
        d.check_asan()


# ---------------------------------------------------------------------------------------------

def t_calibrate_limits(args):
    d = start(args, ["--calib-window", "256", "--calib-windows", "3",
                     "--calib-max-text-bytes", "64KiB"], name="calib_limits")
    try:
        cl = d.client
        text = calib_text(20000)
        expect_rpc_error(lambda: cl.calibrate(text=text, max_windows=4), IA, "max_windows=4",
                         "calib-windows")
        expect_rpc_error(lambda: cl.calibrate(text=text, max_windows=2147483647), IA,
                         "max_windows")
        expect_rpc_error(lambda: cl.calibrate(text=text, window_tokens=257), IA,
                         "window_tokens=257", "calib-window")
        expect_rpc_error(lambda: cl.calibrate(text=calib_text(70000)), IA, "calib-max-text-bytes")
        # less than the limits is fine, and so are the limits themselves
        prof = cl.calibrate(text=text, window_tokens=128, max_windows=2)
        check(len(json.loads(prof.json)["layers"]) > 0, prof.json[:200])
        cl.calibrate(text=text, window_tokens=256, max_windows=3)
        finish(args, d)
    finally:
        d.kill()


def calibrate_ttft(args, window):
    """A maximal Calibrate (`window`-token windows, the most windows the server allows, the
    largest text) does not hold up a Generate: the median of its time to first token stays
    within 2x of an idle daemon's. The idle daemon is a twin started alike, asked in turn with
    the busy one, so both see the same load on this shared machine. The 95th percentile and the
    maximum are printed: on a loaded machine they are noise; that no calibration step is long
    (a Generate waits for the step in flight) is checked in CPU time by golden_calib_steps."""
    opts = ["--calib-window", str(window), "--calib-windows", "1024",
            "--calib-max-text-bytes", "1MiB"]
    d = start(args, opts, name="calib_ttft_%d" % window)
    twin = start(args, opts, name="calib_ttft_%d_idle" % window)
    try:
        cl, ci = d.client, twin.client
        for _ in range(3):
            ttft(cl)  # warm up (and the default profile, if one is built)
            ttft(ci)
        fut = cl.admin.Calibrate.future(gc.pb.CalibrateRequest(
            text=calib_text(1 << 20), window_tokens=window, max_windows=1024), timeout=900)
        time.sleep(1.0)
        # several layers of a window, and at least 40 samples (under ASan a busy TTFT is long
        # enough that 4 s held 38 once): 4 s, or up to 12 s until 40 pairs are in
        busy, idle, t0 = [], [], time.time()
        while not fut.done() and time.time() < t0 + 12.0 and (time.time() < t0 + 4.0 or
                                                               len(busy) < 40):
            busy.append(ttft(cl))
            idle.append(ttft(ci))
        still = not fut.done()
        fut.cancel()
        busy.sort()
        idle = statistics.median(idle) if idle else 1.0
        med = statistics.median(busy) if busy else 0
        p95 = busy[int(len(busy) * 0.95) - 1] if busy else 0
        print("  window %d: TTFT idle %.1f ms; during Calibrate median %.1f ms (%.2fx), p95 %.1f "
              "ms (%.2fx), max %.1f ms (%d samples%s)" %
              (window, idle * 1e3, med * 1e3, med / idle, p95 * 1e3, p95 / idle,
               busy[-1] * 1e3 if busy else 0, len(busy),
               "" if still else "; the calibration ended first"), flush=True)
        check(len(busy) >= 40 and still, "the calibration ended before 40 samples")
        check(med <= 2.0 * idle, "window %d: TTFT during Calibrate %.1f ms > 2x idle %.1f ms" %
              (window, med * 1e3, idle * 1e3))
        deadline = time.time() + 30
        while time.time() < deadline and "calibration stopped after" not in d.log_text():
            time.sleep(0.05)
        check("calibration stopped after" in d.log_text(), "the cancelled calibration did not "
              "stop:\n" + d.tail())
        finish(args, d)
        finish(args, twin)
    finally:
        d.kill()
        twin.kill()


def t_calibrate_ttft(args):
    """The default 1024-token windows."""
    calibrate_ttft(args, 1024)


def t_calibrate_ttft_4096(args):
    """4096-token windows (issue 17 must-show): a window's hidden-state covariance is
    accumulated a slice of rows per step, its slices get thinner deep into a layer (their
    attention bounded by a 1024-token context's), and each layer ends in parts (query spectra a
    few heads at a time, then the hidden-state eigensolve, then the rest), so no step carries a
    whole window's O(rows) work. (Before, on this machine: median 1.0-1.9x, p95 1.7-2.6x, max
    up to 4x; the lead measured a 2.5x median.)"""
    calibrate_ttft(args, 4096)


def t_calibrate_cancel(args):
    d = start(args, ["--calib-window", "4096", "--calib-windows", "1024"], name="calib_cancel")
    try:
        cl = d.client
        text = calib_text(1 << 20)
        # a deadline of 2 s: the client gives up, the calibration must end with it
        t0 = time.time()
        expect_rpc_error(lambda: cl.calibrate(text=text, max_windows=1024, timeout=2.0),
                         grpc.StatusCode.DEADLINE_EXCEEDED)
        # an explicit cancel of a second one
        fut = cl.admin.Calibrate.future(gc.pb.CalibrateRequest(text=text, max_windows=1024),
                                        timeout=600)
        time.sleep(1.5)
        fut.cancel()
        # the log says both ended; a small calibration then runs at once (not after the others)
        deadline = time.time() + 30
        while time.time() < deadline and d.log_text().count("calibration stopped after") < 2:
            time.sleep(0.1)
        check(d.log_text().count("calibration stopped after") >= 2,
              "the abandoned calibrations did not stop:\n" + d.tail())
        t1 = time.time()
        cl.calibrate(text=calib_text(20000), window_tokens=256, max_windows=1, timeout=60)
        check(time.time() - t1 < 20, "a small Calibrate took %.1fs" % (time.time() - t1))
        print("  both abandoned calibrations ended within %.1fs" % (t1 - t0))
        finish(args, d)
    finally:
        d.kill()


def t_calibrate_drain(args):
    d = start(args, ["--calib-window", "4096", "--calib-windows", "1024", "--drain-timeout",
                     "3000"], name="calib_drain")
    try:
        text = calib_text(1 << 20)
        res = {}

        def calibrate():
            c2 = gc.Client(d.addr, timeout=600.0)
            try:
                c2.calibrate(text=text, max_windows=1024, timeout=600.0)
                res["ok"] = True
            except grpc.RpcError as e:
                res["code"] = e.code()
            finally:
                c2.close()

        th = threading.Thread(target=calibrate, daemon=True)
        th.start()
        time.sleep(1.5)
        check(th.is_alive(), "the calibration ended too soon: %s" % res)
        t0 = time.time()
        code = d.stop(timeout=30)
        took = time.time() - t0
        th.join(10)
        check(d.exit_ok(code), "exit code %s:\n%s" % (code, d.tail()))
        check(took < 10, "SIGTERM took %.1fs with a calibration running" % took)
        check(res.get("code") == grpc.StatusCode.UNAVAILABLE, "Calibrate ended with %s" % res)
        if args.asan:
            d.check_asan()
    finally:
        d.kill()


def t_client_ub(args):
    d = start(args, name="client_ub")
    try:
        cl = d.client
        comp = gc.pb.CompressionParams(policy="streamingllm", kv_budget=64,
                                       sink_tokens=2147483648)
        expect_rpc_error(lambda: cl.generate(cl.request(text="Hello", max_tokens=2,
                                                         compression=comp)),
                         IA, "sink_tokens")
        comp = gc.pb.CompressionParams(policy="streamingllm", kv_budget=4, sink_tokens=1025)
        expect_rpc_error(lambda: cl.generate(cl.request(text="Hello", max_tokens=2,
                                                         compression=comp)),
                         IA, "sink_tokens")
        # first tokens that may have no text: sampled at high temperature, many seeds
        for seed in range(40):
            cl.generate(cl.request(text="Hi", max_tokens=2, temperature=5.0, seed=seed))
        finish(args, d)
    finally:
        d.kill()


def poison(model_dir, out_dir, tensor):
    """A copy of the model with the first values of `tensor` NaN (0xFF bytes)."""
    shutil.copytree(model_dir, out_dir)
    for name in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, name), 0o644)
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(out_dir, name)
        with open(path, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            hdr = json.loads(f.read(n))
            if tensor in hdr:
                f.seek(8 + n + hdr[tensor]["data_offsets"][0])
                f.write(b"\xff" * 64)
                return
    raise TestFailure("tensor %s not found" % tensor)


def scale_tensors(model_dir, out_dir, tensors, k, rows=None):
    """A copy of the model with every value of `tensors` (BF16, F16 or F32; only rows
    [rows[0], rows[1]) when given) times 2^k, exactly (the exponent field moves; zeros stay
    zero): finite weights whose products overflow."""
    shutil.copytree(model_dir, out_dir)
    left = set(tensors)
    for name in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, name), 0o644)
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(out_dir, name), "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            hdr = json.loads(f.read(n))
            for t in tensors:
                if t not in hdr:
                    continue
                fmt, bits, shift = {"BF16": ("<H", 2, 7), "F16": ("<H", 2, 10),
                                    "F32": ("<I", 4, 23)}[hdr[t]["dtype"]]
                b, e = hdr[t]["data_offsets"]
                if rows:
                    row_bytes = (e - b) // hdr[t]["shape"][0]
                    b, e = b + rows[0] * row_bytes, b + rows[1] * row_bytes
                f.seek(8 + n + b)
                raw = bytearray(f.read(e - b))
                mask = (0xff if bits == 4 or shift == 7 else 0x1f) << shift
                for i in range(0, len(raw), bits):
                    u = struct.unpack_from(fmt, raw, i)[0]
                    if u & mask:
                        u2 = u + (k << shift)
                        check((u2 & mask) != mask and (u2 & mask) > (u & mask),
                              "%s: 2^%d overflows a weight" % (t, k))
                        struct.pack_into(fmt, raw, i, u2)
                f.seek(8 + n + b)
                f.write(raw)
                left.discard(t)
    check(not left, "tensors not found: %s" % left)


def t_overflow_named(args):
    """issue 17: finite weights whose activations overflow. (1) Layer 3's gate and up
    projections times 2^83: their product passes the float range at every token, layer 4's K/V
    cache is the first non-finite one. (2) Layer 3's V projection times 2^129 for KV heads 2
    and 3 only: layer 3's V of those heads overflows; at tp 2 only rank 1 holds them, rank 0's
    first non-finite layer is 4, and the ranks must agree on 3. Every request ends with
    INTERNAL naming the layer, and so does the log, at tp 1 and tp 2."""
    tmp = tempfile.mkdtemp(prefix="uncomp_overflow_")
    mlp, vproj = os.path.join(tmp, "mlp"), os.path.join(tmp, "vproj")
    scale_tensors(args.model, mlp, ["model.layers.3.mlp.gate_proj.weight",
                                    "model.layers.3.mlp.up_proj.weight"], 83)
    d_head = 32
    scale_tensors(args.model, vproj, ["model.layers.3.self_attn.v_proj.weight"], 129,
                  rows=(2 * d_head, 4 * d_head))
    want = {mlp: "activations arose in layer 3: its K/V cache is finite, layer 4's is not",
            vproj: "activations arose in layer 2: its K/V cache is finite, layer 3's is not"}
    try:
        for model, np_ in ((mlp, 1), (mlp, 2), (vproj, 1), (vproj, 2)):
            d = start(args, ["--policy", "full"], np=np_, model=model,
                      name="overflow_%s_%d" % (os.path.basename(model), np_))
            try:
                cl = d.client
                for kw in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 1}):
                    e = expect_rpc_error(
                        lambda: cl.generate(cl.request(text="Hello there", max_tokens=4, **kw)),
                        grpc.StatusCode.INTERNAL, "non-finite")
                    print("  %s tp %d %s: %s" % (os.path.basename(model), np_, kw, e.details()))
                    check(want[model] in e.details(), e.details())
                log = d.log_text()
                check("non-finite " + want[model] in log, d.tail())
                check("every weight of this rank is finite" in log, d.tail())
                check("non-finite weight" not in log, d.tail())
                finish(args, d)
            finally:
                d.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def t_nan_weights(args):
    tmp = tempfile.mkdtemp(prefix="uncomp_nan_")
    model = os.path.join(tmp, "m")
    poison(args.model, model, "model.layers.3.mlp.down_proj.weight")
    d = start(args, ["--policy", "full"], model=model, name="nan")
    try:
        cl = d.client
        for kw in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 1}):
            e = expect_rpc_error(lambda: cl.generate(cl.request(text="Hello there", max_tokens=4,
                                                                **kw)),
                                 grpc.StatusCode.INTERNAL, "non-finite")
            print("  %s: %s" % (kw, e.details()))
            check("activations arose in layer 3:" in e.details(), e.details())
        log = d.log_text()
        check("non-finite weight" in log and "layer 3" in log, d.tail())
        check("the first non-finite weight is in layer 3" in log, d.tail())
        finish(args, d)
    finally:
        d.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def t_metrics_idle_conns(args):
    d = start(args, name="metrics_conns")
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", d.metrics_port), timeout=5)
            socks.append(s)
        trickle = socket.create_connection(("127.0.0.1", d.metrics_port), timeout=5)
        trickle.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.5)
        t0 = time.time()
        code, _, body = scrape(d.metrics_port)
        check(code == 200 and "uncomp:" in body, "scrape %s" % code)
        print("  scrape with 201 idle connections: %.0f ms" % ((time.time() - t0) * 1e3))
        # the idle ones are closed by the per-connection timeout
        time.sleep(12)
        closed = 0
        for s in socks[:20]:
            try:
                s.settimeout(0.5)
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        check(closed == 20, "only %d of 20 idle connections were closed" % closed)
        trickle.close()
        finish(args, d)
    finally:
        for s in socks:
            s.close()
        d.kill()


def t_info_no_paths(args):
    d = start(args, name="info_paths")
    try:
        cl = d.client
        info = str(cl.model_info())
        prof = str(cl.profile())
        for what, text in (("GetModelInfo", info), ("GetCompressionProfile", prof)):
            for p in (os.path.abspath(args.model), d.tmp, "/work/", "/tmp/"):
                check(p not in text, "%s carries a server path %s:\n%s" % (what, p, text[:800]))
        finish(args, d)
    finally:
        d.kill()

def t_calibrate_prefill_memory(args):
    """--prefill-memory 1MiB holds one prompt's buffers at a time (a 1024-token window or a
    600-token prompt each take several MiB; one prompt may always start). A Generate that arrives
    while a calibration window is being prefilled must wait for the window to end, not forever:
    the scheduler used to skip the window because a request's prompt was prefilling, and the
    prompt because its buffers did not fit beside the window's."""
    d = start(args, ["--calib-window", "1024", "--calib-windows", "1024", "--prefill-memory",
                     "1MiB"], name="calib_pfmem")
    try:
        cl = d.client
        fut = cl.admin.Calibrate.future(gc.pb.CalibrateRequest(
            text=calib_text(1 << 20), window_tokens=1024, max_windows=1024), timeout=900)
        time.sleep(1.5)  # a window is being prefilled (each takes a hundred steps and more)
        check(not fut.done(), "the calibration ended too soon")
        prompt = calib_text(3000)
        check(len(cl.tokenize(prompt).token_ids) >= 500, "the prompt is too short")
        t0 = time.time()
        try:
            _, _, comp, _ = cl.generate(text=prompt, max_tokens=2, temperature=0.0,
                                        timeout=60.0 * (3 if args.asan else 1))
        except grpc.RpcError as e:
            raise TestFailure("a Generate during the calibration ended with %s after %.1fs "
                              "(%s)" % (e.code(), time.time() - t0, e.details()))
        check(comp.usage.completion_tokens == 2, "completion: %s" % comp)
        check(not fut.done(), "the calibration ended before the Generate: the check says nothing")
        print("  the Generate took %.1fs beside the calibration" % (time.time() - t0))
        fut.cancel()
        finish(args, d)
    finally:
        d.kill()


def t_port_taken(args):
    """A test daemon whose gRPC port was taken between free_port's choice and its bind (by an
    outgoing connection or another test) is started again on another port instead of failing the
    test (CI, 2026-12-05: calibrate_ttft_4096 failed so, its port taken as Open MPI connected)."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", free_port()))
    held.listen(1)
    taken = held.getsockname()[1]
    d = Daemon(args, [], name="port_taken", port=taken)
    try:
        d.wait_serving()
        check(d.port != taken and d.respawns == 1,
              "port %d (taken %d), %d restarts" % (d.port, taken, d.respawns))
        check("cannot listen on 127.0.0.1:%d" % taken in d.log_text(),
              "the first start did not fail on the taken port:\n%s" % d.tail())
        _, _, comp, _ = d.client.generate(text="Once upon a time", max_tokens=2, temperature=0.0,
                                          timeout=60.0)
        check(comp.usage.completion_tokens == 2, "completion: %s" % comp)
        finish(args, d)
    finally:
        d.kill()
        held.close()


TESTS = [t_port_taken, t_calibrate_limits, t_calibrate_ttft, t_calibrate_ttft_4096,
         t_calibrate_cancel, t_calibrate_drain, t_calibrate_prefill_memory,
         t_client_ub, t_nan_weights, t_overflow_named, t_metrics_idle_conns, t_info_no_paths]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", default=os.environ.get(
        "UNCOMPD", os.path.join(REPO, "build", "daemon", "uncompd")))
    ap.add_argument("--model", default=os.environ.get(
        "UNCOMP_TEST_MODEL", os.path.join(REPO, "..", "shared", "models", "uncomp-tiny")))
    ap.add_argument("--mpirun", default=os.environ.get("MPIRUN", "mpirun"))
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--asan", action="store_true")
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)  # ctest's empty $<...> argument
    args = ap.parse_args()
    args.daemon = os.path.abspath(args.daemon)
    if not os.access(args.daemon, os.X_OK):
        print("uncompd not found at %s" % args.daemon)
        return 77
    r = Runner(args.only, 120 * (3 if args.asan else 1))
    t0 = time.time()
    for t in TESTS:
        if r.want(t):
            r.run(t, args, on_timeout=lambda: None)
    print("==== %d passed, %d failed (%.1fs)%s" % (r.passed, len(r.failed), time.time() - t0,
                                                  (": " + ", ".join(r.failed)) if r.failed
                                                  else ""))
    return min(len(r.failed), 76)


if __name__ == "__main__":
    sys.exit(main())

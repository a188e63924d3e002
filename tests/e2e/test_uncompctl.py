"""End-to-end tests of uncompctl (client/) against the real uncompd, on loopback only.

Starts the daemon (one rank, then `mpirun -np 2 ... --tp 2`, then one with TLS when openssl can
make a certificate) and runs every uncompctl command, checking outputs and exit codes:
generate (streamed, --json greedy reproducible, --file/stdin/--ids give the same result, stop
strings, compression report, --verbose), tokenize/detokenize round trip, text with NUL bytes
through --file and stdin, info and its sections,
health, profile/calibrate (a row per layer), set-policy, abort, drain, bench (text report,
--json, --compare, --rate/--duration, --prompt-file), and the error paths: usage errors exit 2,
server errors exit 1 naming the gRPC code (INVALID_ARGUMENT, DEADLINE_EXCEEDED), a daemon that is
down or drained exits 3. Ports are picked free at run time; every step has a timeout.

    /usr/bin/python3 tests/e2e/test_uncompctl.py [--uncompctl PATH] [--daemon PATH]
                                                 [--model DIR] [--mpirun PATH] [--no-mpi]
                                                 [--no-tls] [--only SUBSTRING]

Environment: UNCOMPCTL, UNCOMPD, UNCOMP_TEST_MODEL, MPIRUN. Prints [ RUN ] / [ OK ] / [ FAILED ]
per test and exits with the number of failures (77 when a binary is missing: ctest skip).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from e2e_util import DaemonProcess, TestFailure, check, free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import token_times  # noqa: E402  (tests/bench: the token times and send trace readers)
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
STEP_TIMEOUT_S = 60       # one uncompctl invocation
START_TIMEOUT_S = 90      # daemon start-up to SERVING
PROMPT = "Once upon a time there was a little girl who"
LONG_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 10).strip()
CALIB_TEXT = ("One of the special magic numbers for apple is: 4821. The quick brown fox jumps "
              "over the lazy dog while the cat sleeps in the warm sun by the window. ") * 12

EXIT_OK, EXIT_RPC, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class Result:
    def __init__(self, argv, p):
        self.argv = argv
        self.rc = p.returncode
        self.out = p.stdout.decode("utf-8", errors="replace")
        self.err = p.stderr.decode("utf-8", errors="replace")

    def describe(self):
        return "%s -> exit %s\nstdout: %s\nstderr: %s" % (
            " ".join(self.argv), self.rc, self.out[-1500:], self.err[-1500:])

    def json(self):
        try:
            return json.loads(self.out)
        except ValueError as e:
            raise TestFailure("not JSON (%s):\n%s" % (e, self.describe()))


class Ctl:
    """Runs uncompctl against one server."""

    def __init__(self, exe, server, extra=()):
        self.exe = exe
        self.server = server
        self.extra = list(extra)

    def run(self, *args, expect=EXIT_OK, stdin=None, timeout=STEP_TIMEOUT_S, server=True,
            env=None):
        argv = [self.exe] + (["--server", self.server] if server else []) + self.extra + \
            [str(a) for a in args]
        try:
            p = subprocess.run(argv, input=stdin.encode() if stdin is not None else b"",
                               capture_output=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise TestFailure("timed out after %ss: %s" % (timeout, " ".join(argv)))
        r = Result(argv, p)
        if expect is not None and r.rc != expect:
            raise TestFailure("expected exit %s\n%s" % (expect, r.describe()))
        return r

    def fail(self, code_name, *args, expect=EXIT_RPC, **kw):
        """Runs a command that must fail with `expect` and name the gRPC code on stderr."""
        r = self.run(*args, expect=expect, **kw)
        check(code_name in r.err, "stderr lacks %s\n%s" % (code_name, r.describe()))
        return r


class Daemon(DaemonProcess):
    """The daemon, waited for with uncompctl itself."""

    def __init__(self, args, np=1, name="daemon", extra=()):
        self.args = args
        DaemonProcess.__init__(
            self, args.daemon, args.mpirun,
            (["--model", args.model] if args.model else []) + list(extra), np=np, name=name,
            prefix="uncompctl_e2e_", env_defaults={"OMPI_MCA_rmaps_base_oversubscribe": "1"})

    def wait_serving(self, ctl):
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise TestFailure("daemon exited with %s during start-up:\n%s" %
                                  (self.proc.returncode, self.tail()))
            # health --wait-ms polls SERVING itself; -w retries refused connections
            r = ctl.run("-w", "--connect-timeout-ms", "2000", "health", "--wait-ms", "2000",
                        expect=None, timeout=20)
            if r.rc == EXIT_OK and "SERVING" in r.out:
                return
            time.sleep(0.1)
        raise TestFailure("daemon not SERVING after %ds:\n%s" % (START_TIMEOUT_S, self.tail()))

    def wait_exit(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TestFailure("daemon did not exit within %ds:\n%s" % (timeout, self.tail()))


# ---------------------------------------------------------------------------------------------
# tests without a server
# ---------------------------------------------------------------------------------------------

COMMANDS = ["generate", "chat", "tokenize", "detokenize", "abort", "info", "health", "profile",
            "set-policy", "calibrate", "drain", "bench"]


def t_usage(ctl):
    """--help for the tool and every command exits 0; bad command lines exit 2."""
    r = ctl.run("--help", server=False)
    check("Exit codes" in r.out and "--server" in r.out, r.describe())
    for c in COMMANDS:
        r = ctl.run(c, "--help")
        check(r.out.startswith("usage: uncompctl " + c), r.describe())
        r = ctl.run("help", c)
        check(r.out.startswith("usage: uncompctl " + c), r.describe())
    check("uncompctl" in ctl.run("--version", server=False).out)
    # usage errors: nothing is sent, so no server is needed
    bad = [
        [],                                             # no command
        ["frobnicate"],                                 # unknown command
        ["--bogus-global", "health"],
        ["generate", "--bogus", "x"],
        ["generate", "--max-tokens", "abc", "x"],
        ["generate", "--max-tokens"],                   # missing value
        ["generate", "--temperature", "-1", "x"],
        ["generate", "--ids", "1,x,3"],
        ["generate", "--ids", "1,2", "also text"],
        ["chat", "hello"],                              # messages come from stdin
        ["chat", "--ids", "1,2"],
        ["tokenize", "--file", "/nonexistent/file"],
        ["detokenize", "12", "abc"],
        ["abort"],
        ["info", "a", "b"],
        ["set-policy"],
        ["calibrate", "--file", "a", "--text", "b"],
        ["drain", "--timeout-ms", "soon"],
        ["health", "extra"],
        ["bench", "--concurrency", "0"],
        ["bench", "--compare", "policy=full"],          # one setting only
        ["bench", "--compare", "policy=full", "nokey"],
        ["bench", "--compare", "policy=full", "colour=red"],
        ["bench", "--prompt-tokens", "8", "--prompt-file", "x"],
        ["bench", "stray"],
        ["bench", "--compare", "front=grpc", "front=http"],  # front=http needs --http URL
        ["bench", "--compare", "front=grpc", "front=carrier-pigeon"],
        ["bench", "--http", "https://127.0.0.1:1"],     # no TLS in the bench's HTTP client
        ["bench", "--http", "127.0.0.1:1"],
        ["bench", "--rounds", "0"],
        ["bench", "--rounds", "17"],
        ["bench", "--token-times", "/nonexistent/dir/times.txt"],
    ]
    for argv in bad:
        r = ctl.run(*argv, expect=EXIT_USAGE)
        check(r.out == "" or argv == [], "usage error wrote to stdout\n" + r.describe())


def t_server_down(ctl_down):
    """A port nobody listens on: every command that connects exits 3 and says UNAVAILABLE."""
    for argv in (["health"], ["generate", "-n", "2", "hi"], ["tokenize", "hi"], ["info"],
                 ["profile"], ["drain"], ["bench", "-n", "1"], ["set-policy", "full"],
                 # text prompts over HTTP alone need no gRPC: the HTTP front is down too
                 ["bench", "-n", "1", "--prompt-file", os.path.abspath(__file__), "--http",
                  "http://127.0.0.1:%d" % free_port()]):
        ctl_down.fail("UNAVAILABLE", *argv, expect=EXIT_UNAVAILABLE)
    r = ctl_down.run("--json", "health", expect=EXIT_UNAVAILABLE)
    check(r.json()["error"]["name"] == "UNAVAILABLE", r.describe())
    # -w keeps retrying until the connect timeout
    t0 = time.time()
    ctl_down.fail("UNAVAILABLE", "-w", "--connect-timeout-ms", "600", "health",
                  expect=EXIT_UNAVAILABLE)
    check(time.time() - t0 >= 0.5, "--wait gave up before --connect-timeout-ms")


# ---------------------------------------------------------------------------------------------
# single-rank daemon
# ---------------------------------------------------------------------------------------------

def gen_json(ctl, *args, **kw):
    return ctl.run("generate", "--json", *args, **kw).json()


def t_health(ctl):
    r = ctl.run("health")
    check(r.out.strip() == "SERVING", r.describe())
    j = ctl.run("--json", "health").json()
    check(j == {"status": "SERVING", "serving": True}, str(j))
    # the address can come from $UNCOMP_SERVER
    env = dict(os.environ, UNCOMP_SERVER=ctl.server)
    r = ctl.run("health", server=False, env=env)
    check(r.out.strip() == "SERVING", r.describe())


def t_generate(ctl):
    """Streaming text, --json, greedy reproducibility, inputs from file/stdin/ids, --verbose."""
    r = ctl.run("generate", "-n", "8", "--temperature", "0", "--ignore-eos", PROMPT)
    streamed = r.out
    check(streamed.endswith("\n") and len(streamed.strip()) > 0, r.describe())
    a = gen_json(ctl, "-n", "12", "--temperature", "0", "--ignore-eos", PROMPT)
    b = gen_json(ctl, "-n", "12", "--temperature", "0", "--ignore-eos", PROMPT)
    check(a["text"] == b["text"] and a["token_ids"] == b["token_ids"],
          "greedy output differs between runs:\n%s\n%s" % (a, b))
    check(len(a["token_ids"]) == 12, str(a))
    check(a["finish_reason"] == "length", str(a))
    check(a["usage"]["completion_tokens"] == 12 and a["usage"]["prompt_tokens"] > 5, str(a))
    check(a["request_id"] != "" and a["timing"]["total_ms"] > 0, str(a))
    check(a["timing"]["client_total_ms"] >= a["timing"]["client_ttft_ms"] > 0, str(a))
    check(a["compression"] is not None and a["compression"]["kv_tokens_full"] > 0, str(a))
    # the streamed text is the same as the --json text (8 of the same greedy tokens)
    c8 = gen_json(ctl, "-n", "8", "--temperature", "0", "--ignore-eos", PROMPT)
    check(streamed == c8["text"] + "\n", "stream %r != json %r" % (streamed, c8["text"]))
    check(a["token_ids"][:8] == c8["token_ids"], "greedy prefix differs")
    # the same prompt from --file, from stdin and as token ids
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(PROMPT)
        path = f.name
    try:
        via_file = gen_json(ctl, "-n", "12", "--temperature", "0", "--ignore-eos", "--file", path)
    finally:
        os.unlink(path)
    via_stdin = gen_json(ctl, "-n", "12", "--temperature", "0", "--ignore-eos", stdin=PROMPT)
    check(via_file["token_ids"] == a["token_ids"], "--file differs")
    check(via_stdin["token_ids"] == a["token_ids"], "stdin differs")
    ids = ctl.run("tokenize", PROMPT).out.split()
    via_ids = gen_json(ctl, "-n", "12", "--temperature", "0", "--ignore-eos", "--ids",
                       ",".join(ids))
    check(via_ids["token_ids"] == a["token_ids"], "--ids differs: %s vs %s" %
          (via_ids["token_ids"], a["token_ids"]))
    check(via_ids["usage"]["prompt_tokens"] == len(ids), str(via_ids))
    # seeded sampling is reproducible too
    s1 = gen_json(ctl, "-n", "10", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95",
                  "--seed", "7", "--ignore-eos", PROMPT)
    s2 = gen_json(ctl, "-n", "10", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95",
                  "--seed", "7", "--ignore-eos", PROMPT)
    check(s1["token_ids"] == s2["token_ids"], "seeded sampling differs")
    # --verbose reports usage, timing and compression on stderr, text stays on stdout
    r = ctl.run("generate", "-v", "-n", "4", "--temperature", "0", PROMPT)
    for key in ("usage:", "timing:", "compression:", "finish:"):
        check(key in r.err, "--verbose lacks %s\n%s" % (key, r.describe()))
    check("usage:" not in r.out, r.describe())
    # logprobs
    lp = gen_json(ctl, "-n", "4", "--temperature", "0", "--ignore-eos", "--logprobs", "3", PROMPT)
    check(len(lp["logprobs"]) == 4 and all(x <= 0 for x in lp["logprobs"]), str(lp))


def t_generate_stop(ctl):
    full = gen_json(ctl, "-n", "24", "--temperature", "0", "--ignore-eos", PROMPT)
    text = full["text"]
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", text) if m.start() > 0]
    if not words:
        print("  (no word to stop on in %r)" % text)
        return
    stop = words[len(words) // 2].group(0)
    r = gen_json(ctl, "-n", "24", "--temperature", "0", "--ignore-eos", "--stop", stop,
                 "--stop", "zzzqqq", PROMPT)
    check(r["finish_reason"] == "stop", str(r))
    check(r["matched_stop"] == stop, str(r))
    check(len(r["text"]) < len(text) and text.startswith(r["text"]), "%r vs %r" % (r, text))


def t_generate_compression(ctl):
    full = gen_json(ctl, "-n", "4", "--temperature", "0", "--policy", "full", LONG_PROMPT)
    check(full["compression"]["policy"] == "full", str(full))
    check(full["compression"]["kv_tokens_kept"] == full["compression"]["kv_tokens_full"],
          str(full))
    # (uncomp with grouping=prompt needs no calibration profile)
    for policy in ("snapkv", "streamingllm", "uncomp"):
        c = gen_json(ctl, "-n", "4", "--temperature", "0", "--policy", policy, "--kv-budget",
                     "16", "--grouping", "prompt", LONG_PROMPT)
        rep = c["compression"]
        check(rep["policy"] == policy and rep["kv_budget"] == 16, str(rep))
        check(rep["kv_tokens_full"] == full["compression"]["kv_tokens_full"], str(rep))
        check(0 < rep["kv_tokens_kept"] < rep["kv_tokens_full"], str(rep))
        check(c["usage"]["completion_tokens"] == 4, str(c))
    # ThinK beside snapkv: the same tokens, their keys in 24 of the 32 channels
    c = gen_json(ctl, "-n", "4", "--temperature", "0", "--policy", "snapkv+think",
                 "--think-ratio", "0.25", "--kv-budget", "16", LONG_PROMPT)
    rep = c["compression"]
    check(rep["policy"] == "snapkv+think" and rep["key_channels"] == 24, str(rep))
    # LoRC beside snapkv: latent ranks falling with depth
    c = gen_json(ctl, "-n", "4", "--temperature", "0", "--policy", "snapkv+lorc",
                 "--lorc-ratio", "0.25", "--kv-budget", "16", LONG_PROMPT)
    rep = c["compression"]
    check(rep["policy"] == "snapkv+lorc" and abs(rep["lorc_ratio"] - 0.25) < 1e-6 and
          rep["lorc_rank_first"] > rep["lorc_rank_last"] > 0, str(rep))
    r = ctl.run("generate", "-v", "-n", "2", "--policy", "snapkv", "--kv-budget", "16",
                "--window", "4", "--decode-mode", "evict", LONG_PROMPT)
    check("policy snapkv" in r.err and "decode_mode evict" in r.err, r.describe())


def t_generate_errors(ctl):
    """Server-side validation: exit 1 with the gRPC code name on stderr (and in --json)."""
    ctl.fail("INVALID_ARGUMENT", "generate", "--policy", "bogus", "-n", "2", PROMPT)
    r = ctl.fail("INVALID_ARGUMENT", "generate", "--json", "--policy", "bogus", "-n", "2", PROMPT)
    e = r.json()["error"]
    check(e["name"] == "INVALID_ARGUMENT" and e["code"] == 3 and "bogus" in e["message"], str(e))
    ctl.fail("INVALID_ARGUMENT", "generate", "--decode-mode", "sideways", "-n", "2", PROMPT)
    ctl.fail("INVALID_ARGUMENT", "generate", "--ids", "99999999", "-n", "2")
    # a deadline shorter than the generation: DEADLINE_EXCEEDED, exit 1
    ctl.fail("DEADLINE_EXCEEDED", "--timeout-ms", "150", "generate", "-n", "2000",
             "--ignore-eos", PROMPT)


def t_tokenize(ctl):
    text = "Hello world, this is uncomp."
    ids = ctl.run("tokenize", "--no-special", text).out.split()
    check(len(ids) > 3 and all(i.isdigit() for i in ids), str(ids))
    back = ctl.run("detokenize", *ids).out
    check(back == text + "\n", "round trip %r != %r" % (back, text))
    back = ctl.run("detokenize", ",".join(ids)).out
    check(back == text + "\n", "comma list %r" % back)
    j = ctl.run("--json", "tokenize", "--no-special", text).json()
    check([str(i) for i in j["token_ids"]] == ids and j["count"] == len(ids), str(j))
    check(len(j["tokens"]) == len(ids), str(j))
    check(ctl.run("detokenize", "--json", *ids).json() == {"text": text})
    with_bos = ctl.run("tokenize", text).out.split()
    check(len(with_bos) >= len(ids), "special tokens shrank the list")
    pieces = ctl.run("tokenize", "--pieces", "--no-special", text).out.splitlines()
    check(len(pieces) == len(ids) and all("\t" in p for p in pieces), str(pieces))
    check(ctl.run("tokenize", "--no-special", stdin=text).out.split() == ids, "stdin")
    # non-ASCII survives the round trip and the JSON escaping
    uni = "naïve café — ünïcode ✓"
    uids = ctl.run("tokenize", "--no-special", uni).out.split()
    check(ctl.run("detokenize", "--json", *uids).json()["text"] == uni, "unicode round trip")


def t_nul_bytes(ctl):
    """Text is bytes with a length: a NUL in --file or stdin is sent, and decoded text with a NUL
    is printed whole (both used to stop at the first NUL: "abc\\0def" was sent as "abc")."""
    text = "abc\0def ghi"
    cut = ctl.run("tokenize", "--no-special", "abc").out.split()
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode())
        path = f.name
    try:
        ids = ctl.run("tokenize", "--no-special", "--file", path).out.split()
        check(len(ids) > len(cut) + 1, "NUL cut the --file text: %s vs %s" % (ids, cut))
        check(ctl.run("tokenize", "--no-special", stdin=text).out.split() == ids,
              "stdin differs from --file")
        j = ctl.run("--json", "tokenize", "--no-special", "--file", path).json()
        check([str(i) for i in j["token_ids"]] == ids, str(j))
        # the decode holds the NUL: printed whole, and as \u0000 in JSON
        back = ctl.run("detokenize", *ids)
        check(back.out == text + "\n", "detokenize printed %r" % back.out)
        check(ctl.run("detokenize", "--json", *ids).json() == {"text": text}, "json decode")
        # generate --file sends every byte: the same prompt as its token ids
        with_bos = ctl.run("tokenize", "--file", path).out.split()
        via_file = gen_json(ctl, "-n", "4", "--temperature", "0", "--ignore-eos", "--file", path)
        via_ids = gen_json(ctl, "-n", "4", "--temperature", "0", "--ignore-eos", "--ids",
                           ",".join(with_bos))
        check(via_file["usage"]["prompt_tokens"] == len(with_bos), str(via_file))
        check(via_file["token_ids"] == via_ids["token_ids"], "%s vs %s" % (via_file, via_ids))
        via_stdin = gen_json(ctl, "-n", "4", "--temperature", "0", "--ignore-eos", stdin=text)
        check(via_stdin["usage"]["prompt_tokens"] == len(with_bos), str(via_stdin))
    finally:
        os.unlink(path)


def t_info(ctl):
    r = ctl.run("info")
    for sec in ("# Server", "# Model", "# Requests"):
        check(sec in r.out, "info lacks %s\n%s" % (sec, r.describe()))
    check(re.search(r"^state:SERVING$", r.out, re.M), r.describe())
    r = ctl.run("info", "server")
    check("# Server" in r.out and "# Model" not in r.out, r.describe())
    check("# Model" in ctl.run("info", "model").out)
    check("# Server" in ctl.run("info", "stats").out)
    ctl.fail("INVALID_ARGUMENT", "info", "nosuchsection")
    j = ctl.run("--json", "info").json()
    check(set(j) == {"server", "model", "stats"}, str(j.keys()))
    check(j["server"]["state"] == "SERVING" and j["server"]["tp_size"] >= 1, str(j["server"]))
    check(j["model"]["layers"] > 0 and j["model"]["kv_heads"] > 0, str(j["model"]))
    check(j["stats"]["requests_total"] >= 1 and "# Server" in j["stats"]["text"], str(j["stats"]))
    check(ctl.run("info", "--json", "model").json()["layers"] == j["model"]["layers"])
    st = ctl.run("info", "--json", "requests").json()
    check("# Requests" in st["text"] and "# Server" not in st["text"], st["text"])
    check(st["ttft_ms"]["count"] >= 1, str(st))


def t_profile_calibrate(ctl):
    model = ctl.run("--json", "info", "model").json()
    layers, kv_heads = model["layers"], model["kv_heads"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(CALIB_TEXT)
        path = f.name
    try:
        r = ctl.run("calibrate", "--file", path, "--window-tokens", "64", "--max-windows", "2",
                    timeout=120)
    finally:
        os.unlink(path)
    check(re.search(r"^layer\s+entropy\s+score\s+stage", r.out, re.M), r.describe())
    r = ctl.run("profile")
    rows = [ln for ln in r.out.splitlines() if re.match(r"^\s*\d+\s+[0-9.]+\s+[0-9.]+\s+\d+\s", ln)]
    check(len(rows) == layers, "profile has %d rows for %d layers\n%s" %
          (len(rows), layers, r.out))
    for ln in rows:
        check(len(re.findall(r"[0-9.]+\(g\d+\)", ln)) == kv_heads, "row %r" % ln)
    check("calib tokens:" in r.out and "head groups:" in r.out, r.out)
    j = ctl.run("profile", "--json").json()
    check(j["present"] and len(j["layers"]) == layers, str(j)[:400])
    for i, layer in enumerate(j["layers"]):
        check(layer["layer"] == i and 0 <= layer["entropy"] <= 1, str(layer))
        check(abs(layer["score"] - 100 * layer["entropy"]) < 1e-6 * 100 + 1e-9, str(layer))
        check(len(layer["kv_head_entropy"]) == kv_heads == len(layer["kv_head_group"]),
              str(layer))
    raw = json.loads(ctl.run("profile", "--raw").out)
    check(isinstance(raw, dict) and raw, "--raw is not the profile JSON")
    # the built-in calibration text works too, and --json returns the new profile
    j = ctl.run("calibrate", "--json", "--window-tokens", "64", "--max-windows", "1",
                timeout=120).json()
    check(j["present"] and len(j["layers"]) == layers, str(j)[:400])


def t_set_policy(ctl):
    r = ctl.run("set-policy", "uncomp", "--kv-budget", "32", "--grouping", "prompt")
    check("policy=uncomp" in r.out and "kv_budget=32" in r.out, r.describe())
    check(ctl.run("--json", "info", "server").json()["default_policy"] == "uncomp")
    c = gen_json(ctl, "-n", "2", "--temperature", "0", LONG_PROMPT)
    check(c["compression"]["policy"] == "uncomp" and c["compression"]["kv_budget"] == 32,
          str(c["compression"]))
    ctl.fail("INVALID_ARGUMENT", "set-policy", "bogus")
    e = ctl.fail("INVALID_ARGUMENT", "--json", "set-policy", "--policy", "bogus").json()
    check(e["error"]["name"] == "INVALID_ARGUMENT", str(e))
    j = ctl.run("set-policy", "--json", "full", "--decode-mode", "append", "--grouping",
                "profile").json()
    check(j["policy"] == "full" and j["decode_mode"] == "append" and j["grouping"] == "profile",
          str(j))


def t_abort(ctl):
    rid = "uncompctl-abort-%d" % os.getpid()
    argv = [ctl.exe, "--server", ctl.server, "generate", "--request-id", rid, "-n", "3000",
            "--ignore-eos", PROMPT]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # wait until the request is running (its first bytes arrive), then abort it
        os.set_blocking(p.stdout.fileno(), False)
        deadline = time.time() + 30
        got = b""
        while time.time() < deadline and not got:
            try:
                got = p.stdout.read(1) or b""
            except (BlockingIOError, TypeError):
                got = b""
            if p.poll() is not None:
                break
            time.sleep(0.02)
        check(got, "the generation never started")
        r = ctl.run("abort", rid)
        check("aborted" in r.out, r.describe())
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check(p.returncode == EXIT_RPC, "aborted generate exited %s" % p.returncode)
    check(b"aborted" in err, err)
    j = ctl.run("abort", "--json", "no-such-request").json()
    check(j == {"request_id": "no-such-request", "found": False}, str(j))


def check_send_trace(times, sends, connections, settings=2, steps=None):
    """uncompd --send-trace beside uncompctl bench --token-times: every chunk the client got
    joins the daemon's line of its send (same request id, token counts in order), each send's
    times are in order (emission, hand-off to gRPC, completion), no chunk arrived before its
    hand-off (both on the monotonic clock), each setting's chunks came over `connections`
    client connections (the daemon's peers), and tests/bench/token_times.py says so (with the
    step trace: each late moment names the step that emitted it)."""
    runs, _ = token_times.load_all(times)
    for _ in range(50):  # the last send's line is written when its completion comes
        n = [token_times.join(reqs, token_times.load_sends(sends)) for reqs in runs.values()]
        if all(u == 0 for _, u in n):
            break
        time.sleep(0.1)
    check(len(n) == settings and all(j > 0 and u == 0 for j, u in n),
          "joined, unmatched: %s" % n)
    for reqs in runs.values():
        for c in (c for a in reqs.values() for c in a):
            d = c["send"]
            check(d["ok"] and d["emit_first"] <= d["emit_last"] <= d["start"] <= d["done"] and
                  d["start"] <= c["mono"], "chunk %s, send %s" % (c, d))
        peers = {c["send"]["peer"] for a in reqs.values() for c in a}
        check(len(peers) == connections and all(p.startswith("ipv") for p in peers),
              "%d connection(s) expected, the daemon saw %s" % (connections, sorted(peers)))
    text = "\n".join(token_times.summary(times, over=0.0, send_trace=sends, step_trace=steps))
    check(text.count("chunks joined, 0 not, over %d client connection(s)" % connections) ==
          settings and "the extra time is in" in text, text)
    if steps:
        n = text.count("the extra time is in")
        check(re.search(r"emitted by step \d+ \((decode|mixed|prefill), batch \d+", text) and
              text.count("emitted by step ") == n, text)


def t_bench(ctl):
    r = ctl.run("bench", "-c", "2", "-n", "4", "-m", "4", "--prompt-tokens", "24", timeout=120)
    for key in ("throughput (req/s)", "output tokens/s", "total tokens/s", "TTFT p50 (ms)",
                "TTFT p99 (ms)", "ITL p90 (ms)", "E2E mean (ms)", "requests failed"):
        check(key in r.out, "bench report lacks %r\n%s" % (key, r.describe()))
    check(re.search(r"^requests completed\s+4$", r.out, re.M), r.describe())
    j = ctl.run("bench", "--json", "-c", "2", "-n", "4", "-m", "4", "--prompt-tokens", "24",
                timeout=120).json()
    check(len(j["runs"]) == 1 and j["config"]["concurrency"] == 2, str(j))
    run = j["runs"][0]
    check(run["completed"] == 4 and run["failed"] == 0, str(run))
    check(run["output_tokens_total"] == 16 and run["prompt_tokens_total"] == 4 * 24, str(run))
    check(run["requests_per_s"] > 0 and run["output_tokens_per_s"] > 0, str(run))
    for d in ("ttft_ms", "itl_ms", "e2e_ms"):
        x = run[d]
        check(x["count"] > 0 and 0 < x["p50"] <= x["p90"] <= x["p99"] <= x["max"] + 1e-9,
              "%s %s" % (d, x))
    check(run["e2e_ms"]["p50"] >= run["ttft_ms"]["p50"], str(run))
    # warm-up requests leave no samples: 2 measured requests of 5 tokens give 8 gaps, 2 TTFTs
    for front in ([], ["--http", ctl.http]):
        j = ctl.run("bench", "--json", "-c", "2", "-n", "2", "-m", "5", "--prompt-tokens", "24",
                    "--warmup", "2", *front, timeout=120).json()
        run = j["runs"][0]
        check(len(j["runs"]) == 1 and run["completed"] == 2 and run["itl_ms"]["count"] == 8 and
              run["ttft_ms"]["count"] == 2, "%s: %s" % (front, run))
    # the same load with two compression settings side by side
    j = ctl.run("bench", "--json", "-c", "2", "-n", "3", "-m", "3", "--prompt-tokens", "96",
                "--compare", "policy=full", "policy=snapkv,kv_budget=16", timeout=120).json()
    check([x["setting"] for x in j["runs"]] == ["policy=full", "policy=snapkv,kv_budget=16"],
          str(j))
    check(j["runs"][0]["kv_kept_ratio"] == 1, str(j["runs"][0]))
    check(j["runs"][1]["kv_kept_ratio"] < 1, str(j["runs"][1]))
    check(all(x["completed"] == 3 for x in j["runs"]), str(j))
    # every streamed chunk's arrival, per setting and request (warm-ups left out)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.txt")
        j = ctl.run("bench", "--json", "-c", "2", "-n", "3", "-m", "4", "--prompt-tokens", "24",
                    "--warmup", "1", "--token-times", path, "--compare", "policy=full",
                    "policy=snapkv,kv_budget=16", timeout=120).json()
        with open(path) as f:
            lines = f.read().splitlines()
        rows = [line.split() for line in lines if not line.startswith("#")]
        check(all(len(x) == 6 for x in rows), str(rows))
        # each setting's chunks are followed by its stall probe's summary and '#stall' lines
        check(sum(1 for line in lines if line.startswith("#probe ")) == 2, "\n".join(lines))
        for setting in ("policy=full", "policy=snapkv,kv_budget=16"):
            mine = [x for x in rows if x[0] == setting]
            check(sorted({int(x[1]) for x in mine}) == [0, 1, 2], str(mine))
            check(sum(int(x[2]) for x in mine) == 3 * 4, str(mine))
            for req in range(3):  # in order of arrival, within the run
                t = [float(x[3]) for x in mine if int(x[1]) == req]
                check(t == sorted(t) and t[0] > 0, str(mine))
        check(len(rows) == sum(len([x for x in rows if x[0] == r["setting"]]) for r in j["runs"]),
              str(rows))
        # gRPC's one shared connection; late moments named by the steps that emitted them
        check_send_trace(path, ctl.send_trace, connections=1, steps=ctl.step_trace)
        # warm-up requests at the run's concurrency: of the three streams before the measured
        # one, some overlap in the daemon's send trace (one at a time, none can; the trace is on
        # the monotonic clock, as time.monotonic())
        t_launch = time.monotonic()
        ctl.run("bench", "-c", "3", "-n", "1", "-m", "16", "--prompt-tokens", "24", "--warmup",
                "3", "--token-times", path, timeout=120)
        runs, _ = token_times.load_all(path)
        measured = {c["id"] for reqs in runs.values() for a in reqs.values() for c in a}
        warm = {}
        for _ in range(50):  # a stream's lines reach the file when its last send completes
            warm = {k: v for k, v in token_times.load_sends(ctl.send_trace).items()
                    if v and v[0]["start"] >= t_launch and k not in measured}
            if len(warm) == 3:
                break
            time.sleep(0.1)
        check(len(warm) == 3 and len(measured) == 1, "warm-ups %s, measured %s" % (warm, measured))
        spans = sorted((v[0]["start"], v[-1]["done"]) for v in warm.values())
        check(any(b[0] < a[1] for a, b in zip(spans, spans[1:])),
              "the warm-up streams ran one after another: %s" % spans)
        # clients dealt to their own connections: the daemon sees that many peers (no more
        # connections than clients). The clients take requests from one count, so with as many
        # requests as clients a client started late could find none left (it happened under
        # ctest -j2): four each.
        for clients, asked, conns in ((3, 3, 3), (4, 2, 2), (2, 8, 2)):
            j = ctl.run("bench", "--json", "-c", str(clients), "-n", str(4 * clients), "-m", "3",
                        "--prompt-tokens", "24", "--connections", str(asked), "--token-times",
                        path, timeout=120).json()
            check(j["config"]["connections"] == conns, str(j["config"]))
            check_send_trace(path, ctl.send_trace, connections=conns, settings=1)
    r = ctl.run("bench", "-n", "2", "-m", "2", "--prompt-tokens", "16", "--compare",
                "policy=full", "policy=streamingllm,kv_budget=8", timeout=120)
    header = r.out.splitlines()[2]
    check("policy=full" in header and "policy=streamingllm,kv_budget=8" in header, r.out)
    # open loop: Poisson arrivals for a fixed time; prompts from a file
    j = ctl.run("bench", "--json", "--rate", "8", "--duration", "1", "-c", "4", "-m", "2",
                "--prompt-tokens", "16", "--seed", "3", timeout=120).json()
    check(j["runs"][0]["completed"] >= 1 and j["runs"][0]["failed"] == 0, str(j))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(PROMPT + "\n" + LONG_PROMPT + "\n\nThe best way to start a startup is to\n")
        path = f.name
    try:
        j = ctl.run("bench", "--json", "-n", "3", "-m", "2", "--prompt-file", path,
                    timeout=120).json()
    finally:
        os.unlink(path)
    check(j["runs"][0]["completed"] == 3 and j["config"]["prompts"] == "file", str(j))
    # server errors are counted by code, not fatal; all failed -> exit 1
    r = ctl.run("bench", "-n", "2", "-m", "2", "--policy", "bogus", expect=EXIT_RPC,
                timeout=120)
    check("INVALID_ARGUMENT=2" in r.out and "INVALID_ARGUMENT" in r.err, r.describe())
    # the same load through gRPC and the HTTP front, alternating, with medians
    j = ctl.run("bench", "--json", "--http", ctl.http, "-c", "2", "-n", "4", "-m", "4",
                "--prompt-tokens", "96", "--rounds", "2", "--compare", "front=grpc",
                "front=http,policy=snapkv,kv_budget=16", timeout=120).json()
    check(j["config"]["rounds"] == 2 and len(j["runs"]) == 4 and len(j["medians"]) == 2, str(j))
    check([(x["setting"], x["round"]) for x in j["runs"]] ==
          [("front=grpc", 1), ("front=http,policy=snapkv,kv_budget=16", 1), ("front=grpc", 2),
           ("front=http,policy=snapkv,kv_budget=16", 2)], str(j["runs"]))
    for run in j["runs"]:
        check(run["completed"] == 4 and run["failed"] == 0, str(run))
        check(run["output_tokens_total"] == 16 and run["prompt_tokens_total"] == 4 * 96, str(run))
        check(run["ttft_ms"]["count"] == 4 and run["itl_ms"]["count"] > 0, str(run))
    check(j["runs"][0]["kv_kept_ratio"] == 1 and j["runs"][1]["kv_kept_ratio"] < 1,
          "the HTTP runs carry the compression setting: %s" % j["runs"][1])
    med = j["medians"][1]
    check(min(x["e2e_ms"]["p50"] for x in j["runs"][1::2]) <= med["e2e_ms"]["p50"] <=
          max(x["e2e_ms"]["p50"] for x in j["runs"][1::2]), str(med))
    # --http alone: every run over HTTP; HTTP errors are counted under the gRPC code names
    r = ctl.run("bench", "--http", ctl.http, "-n", "2", "-m", "2", "--prompt-tokens", "8",
                "--policy", "bogus", expect=EXIT_RPC, timeout=120)
    check("INVALID_ARGUMENT=2" in r.out, r.describe())
    r = ctl.run("bench", "--http", ctl.http, "-n", "2", "-m", "3", "--prompt-tokens", "8",
                timeout=120)
    check(re.search(r"^requests completed\s+2$", r.out, re.M) and ctl.http in r.out,
          r.describe())


def t_bench_wall(ctl):
    """A run's wall time ends with its last request: the rates are taken over it. It used to end
    when the bench's main thread next polled its workers, up to 100 ms after the last response
    (0.6% off every rate of a 17 s serving run), so four runs all within 30 ms of their last
    token failed ~97% of the time before the fix."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.txt")
        for _ in range(4):
            j = ctl.run("bench", "--json", "-c", "2", "-n", "4", "-m", "4", "--prompt-tokens",
                        "24", "--token-times", path, timeout=120).json()
            with open(path) as f:
                rows = [line.split() for line in f if not line.startswith("#")]
            last = max(float(x[-3]) for x in rows)  # the setting may hold spaces
            wall = j["runs"][0]["duration_s"]
            check(last <= wall <= last + 0.030,
                  "wall %.4f s against the last token at %.4f s" % (wall, last))


def t_drain(ctl, d):
    """Drain: reports, health goes away, the daemon exits 0; then every command exits 3."""
    r = ctl.run("drain", "--timeout-ms", "5000")
    check(re.match(r"drained: \d+ finished, \d+ aborted", r.out), r.describe())
    code = d.wait_exit(60)
    check(code == 0, "daemon exit %s after drain:\n%s" % (code, d.tail()))
    ctl.fail("UNAVAILABLE", "health", expect=EXIT_UNAVAILABLE)
    ctl.fail("UNAVAILABLE", "generate", "-n", "1", "hi", expect=EXIT_UNAVAILABLE)


# ---------------------------------------------------------------------------------------------
# tp 2 and TLS
# ---------------------------------------------------------------------------------------------

def t_tp2(ctl, d, single):
    j = ctl.run("--json", "info", "server").json()
    check(j["tp_size"] == 2 and len(j["ranks"]) == 2, str(j))
    check(ctl.run("health").out.strip() == "SERVING")
    a = gen_json(ctl, "-n", "10", "--temperature", "0", "--ignore-eos", PROMPT)
    b = gen_json(ctl, "-n", "10", "--temperature", "0", "--ignore-eos", PROMPT)
    check(a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 10, "%s\n%s" % (a, b))
    if single is not None and a["token_ids"] != single:
        print("  (note: tp 2 greedy tokens differ from tp 1: %s vs %s)" % (a["token_ids"], single))
    c = gen_json(ctl, "-n", "3", "--temperature", "0", "--policy", "uncomp", "--kv-budget", "16",
                 "--grouping", "prompt", LONG_PROMPT)
    check(0 < c["compression"]["kv_tokens_kept"] < c["compression"]["kv_tokens_full"], str(c))
    ids = ctl.run("tokenize", "--no-special", PROMPT).out.split()
    check(ctl.run("detokenize", *ids).out == PROMPT + "\n")
    ctl.fail("INVALID_ARGUMENT", "generate", "--policy", "bogus", PROMPT)
    j = ctl.run("bench", "--json", "-c", "2", "-n", "4", "-m", "3", "--prompt-tokens", "24",
                timeout=120).json()
    check(j["runs"][0]["completed"] == 4, str(j))
    r = ctl.run("profile")
    check("layer" in r.out or "no compression profile" in r.out, r.describe())
    t_drain(ctl, d)


def t_tls(args, exe):
    tmp = tempfile.mkdtemp(prefix="uncompctl_tls_")
    key, cert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       capture_output=True, timeout=60)
    if p.returncode != 0:
        print("  (skipped: openssl cannot make a certificate)")
        return
    d = Daemon(args, name="tls", extra=["--tls-cert", cert, "--tls-key", key])
    try:
        tls = Ctl(exe, d.addr, ["--tls-ca", cert, "--tls-server-name", "localhost"])
        d.wait_serving(tls)
        check(tls.run("health").out.strip() == "SERVING")
        j = gen_json(tls, "-n", "3", "--temperature", "0", "--ignore-eos", PROMPT)
        check(j["usage"]["completion_tokens"] == 3, str(j))
        plain = Ctl(exe, d.addr)
        plain.fail("UNAVAILABLE", "health", expect=EXIT_UNAVAILABLE)
        wrong = Ctl(exe, d.addr, ["--tls-ca", cert, "--tls-server-name", "not-this-host"])
        wrong.fail("UNAVAILABLE", "health", expect=EXIT_UNAVAILABLE)
        bad = Ctl(exe, d.addr, ["--tls-ca", "/nonexistent.pem"])
        bad.run("health", expect=EXIT_USAGE)  # unreadable certificate file: a local error
        t_drain(tls, d)
    finally:
        d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def t_api_key(args, exe):
    """--api-key (or $UNCOMP_API_KEY) for a server started with keys."""
    d = Daemon(args, name="keys", extra=["--api-key", "k-user-123", "--http-listen", "0"])
    try:
        ok = Ctl(exe, d.addr, ["--api-key", "k-user-123"])
        d.wait_serving(ok)
        j = gen_json(ok, "-n", "2", "--temperature", "0", PROMPT)
        check(j["usage"]["completion_tokens"] == 2, str(j))
        none = Ctl(exe, d.addr)
        none.fail("UNAUTHENTICATED", "generate", "-n", "2", PROMPT)
        Ctl(exe, d.addr, ["--api-key", "wrong"]).fail("UNAUTHENTICATED", "generate", "-n", "2",
                                                       PROMPT)
        env = dict(os.environ, UNCOMP_API_KEY="k-user-123")
        r = none.run("generate", "-n", "2", PROMPT, env=env)
        check(r.rc == EXIT_OK, r.describe())
    finally:
        d.cleanup()


def t_chat(args, exe):
    """chat: two turns from a here-doc on stdin; the second reply is what Chat returns for the
    whole history (greedy); /reset forgets it; --system leads the conversation; /exit ends."""
    import grpc_client  # python3-grpcio: only this test needs it

    tmpl = os.path.join(REPO, "tests", "conformance", "chat_templates", "chatml.jinja")
    d = Daemon(args, name="chat", extra=["--chat-template", tmpl, "--http-listen", "0"])
    cl = None
    try:
        ctl = Ctl(exe, d.addr)
        d.wait_serving(ctl)
        cl = grpc_client.Client(d.addr)
        opts = ["-n", "8", "--temperature", "0", "--ignore-eos"]

        def chat_call(conv):
            text = ""
            for r in cl.chat(conv, max_tokens=8, temperature=0.0, ignore_eos=True):
                if r.WhichOneof("kind") == "chunk":
                    text += r.chunk.text
            return text

        a, b = "Hello, who are you?", "Tell me a story."
        stdin = "%s\n\n%s\n/reset\n%s\n/exit\n%s\n" % (a, b, a, b)
        r = ctl.run("--json", "chat", *opts, stdin=stdin)
        turns = [json.loads(line) for line in r.out.splitlines() if line.strip()]
        check(len(turns) == 3, "3 turns (empty line skipped, /exit ends):\n" + r.describe())
        first = chat_call([("user", a)])
        check(turns[0]["text"] == first, "turn 1 %r != Chat %r" % (turns[0]["text"], first))
        second = chat_call([("user", a), ("assistant", first), ("user", b)])
        check(turns[1]["text"] == second,
              "turn 2 %r != Chat of the history %r" % (turns[1]["text"], second))
        check(turns[1]["usage"]["prompt_tokens"] > turns[0]["usage"]["prompt_tokens"],
              "turn 2 sent the history: %s" % turns)
        check(turns[2]["text"] == first and
              turns[2]["usage"]["prompt_tokens"] == turns[0]["usage"]["prompt_tokens"],
              "after /reset the first turn again: %s" % turns)
        check(all(t["usage"]["completion_tokens"] == 8 for t in turns), str(turns))
        # streamed: each reply then a newline; no prompt when stdin is not a terminal
        r = ctl.run("chat", *opts, stdin="%s\n%s\n" % (a, b))
        check(r.out == first + "\n" + second + "\n", "streamed %r\n%s" % (r.out, r.describe()))
        # --system leads the conversation and survives /reset
        sys_text = "You are terse."
        want = chat_call([("system", sys_text), ("user", a)])
        r = ctl.run("--json", "chat", "--system", sys_text, *opts,
                    stdin="%s\n/reset\n%s\n" % (a, a))
        turns = [json.loads(line) for line in r.out.splitlines() if line.strip()]
        check([t["text"] for t in turns] == [want, want], "--system %s != %r" % (turns, want))
        # a server error exits 1 at the first turn
        ctl.fail("INVALID_ARGUMENT", "chat", "--policy", "nonsense", "-n", "2", stdin="hi\nhi\n")
        r = ctl.run("chat", "--help")
        check("/reset" in r.out and "--system" in r.out, r.describe())
    finally:
        if cl:
            cl.close()
        d.cleanup()


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, only):
        self.only = only
        self.failed = []
        self.passed = 0

    def want(self, name):
        return not self.only or any(o in name for o in self.only)

    def run(self, name, fn, *a, always=False):
        if not always and not self.want(name):
            return True
        print("[ RUN      ] %s" % name, flush=True)
        t0 = time.time()
        try:
            fn(*a)
            print("[       OK ] %s (%.1fs)" % (name, time.time() - t0), flush=True)
            self.passed += 1
            return True
        except Exception as e:  # noqa: BLE001 - report every failure, go on
            print("[  FAILED  ] %s (%.1fs): %s" % (name, time.time() - t0, e), flush=True)
            if not isinstance(e, TestFailure):
                traceback.print_exc()
            self.failed.append(name)
            return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uncompctl", default=os.environ.get(
        "UNCOMPCTL", os.path.join(REPO, "build", "client", "uncompctl")))
    ap.add_argument("--daemon", default=os.environ.get(
        "UNCOMPD", os.path.join(REPO, "build", "daemon", "uncompd")))
    ap.add_argument("--model", default=os.environ.get("UNCOMP_TEST_MODEL"),
                    help="model folder (default: the daemon's bundled models/uncomp-tiny, which "
                    "has the built-in calibration text)")
    ap.add_argument("--mpirun", default=os.environ.get("MPIRUN", "mpirun"))
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--no-mpi", action="store_true")
    ap.add_argument("--no-tls", action="store_true")
    args = ap.parse_args()
    for exe in (args.uncompctl, args.daemon):
        if not os.access(exe, os.X_OK):
            print("not found: %s" % exe)
            return 77
    args.uncompctl = os.path.abspath(args.uncompctl)
    args.daemon = os.path.abspath(args.daemon)
    if args.model and not os.path.exists(os.path.join(args.model, "config.json")):
        print("model %s missing: using the daemon's bundled model" % args.model)
        args.model = None
    t_start = time.time()
    r = Runner(args.only)
    exe = args.uncompctl

    r.run("usage", t_usage, Ctl(exe, "127.0.0.1:%d" % free_port()))
    r.run("server_down", t_server_down, Ctl(exe, "127.0.0.1:%d" % free_port()))

    single_ids = None
    tests = [("health", t_health), ("generate", t_generate), ("generate_stop", t_generate_stop),
             ("generate_compression", t_generate_compression),
             ("generate_errors", t_generate_errors), ("tokenize", t_tokenize),
             ("nul_bytes", t_nul_bytes),
             ("info", t_info), ("profile_calibrate", t_profile_calibrate),
             ("set_policy", t_set_policy), ("abort", t_abort), ("bench", t_bench),
             ("bench_wall", t_bench_wall)]
    if any(r.want(n) for n, _ in tests) or r.want("drain"):
        http_port = free_port()
        traces = tempfile.mkdtemp(prefix="uncomp_sends_")
        sends = os.path.join(traces, "sends.jsonl")
        steps = os.path.join(traces, "steps.jsonl")
        d = Daemon(args, name="single", extra=["--http-listen", "127.0.0.1:%d" % http_port,
                                               "--send-trace", sends, "--step-trace", steps])
        ctl = Ctl(exe, d.addr)
        ctl.http = "http://127.0.0.1:%d" % http_port
        ctl.send_trace = sends
        ctl.step_trace = steps
        try:
            if r.run("start_single", d.wait_serving, ctl, always=True):
                for name, fn in tests:
                    if d.proc.poll() is not None:
                        print("[  FAILED  ] %s: the daemon died (exit %s):\n%s" %
                              (name, d.proc.returncode, d.tail()), flush=True)
                        r.failed.append(name)
                        continue
                    r.run(name, fn, ctl)
                try:
                    single_ids = gen_json(ctl, "-n", "10", "--temperature", "0", "--ignore-eos",
                                          PROMPT)["token_ids"]
                except TestFailure:
                    pass
                r.run("drain", t_drain, ctl, d, always=True)
        finally:
            d.cleanup()
            shutil.rmtree(os.path.dirname(sends), ignore_errors=True)

    if not args.no_mpi and r.want("tp2"):
        d = Daemon(args, np=2, name="tp2")
        ctl = Ctl(exe, d.addr)
        try:
            if r.run("start_tp2", d.wait_serving, ctl, always=True):
                r.run("tp2", t_tp2, ctl, d, single_ids)
        finally:
            d.cleanup()

    if not args.no_tls and shutil.which("openssl") and r.want("tls"):
        r.run("tls", t_tls, args, exe)
    if r.want("api_key"):
        r.run("api_key", t_api_key, args, exe)
    if r.want("chat"):
        r.run("chat", t_chat, args, exe)

    print("%d passed, %d failed (%.1fs)%s" % (r.passed, len(r.failed), time.time() - t_start,
                                               ": " + ", ".join(r.failed) if r.failed else ""))
    return len(r.failed)


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the end-to-end test scripts: assertions, free loopback ports and the daemon
process under test."""
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile


# More daemon flags for every DaemonProcess, from the environment: tests/cuda/device_check.sh runs
# both suites with UC_E2E_DAEMON_ARGS="--backend cuda" on a GPU host. Unset (every CPU run, ctest)
# it adds nothing.
EXTRA_DAEMON_ARGS = shlex.split(os.environ.get("UC_E2E_DAEMON_ARGS", ""))


def daemon_backend():
    """The backend the daemons under test run on: the last --backend of UC_E2E_DAEMON_ARGS, else
    the daemon's default, cpu."""
    backend = "cpu"
    for i, a in enumerate(EXTRA_DAEMON_ARGS):
        if a == "--backend" and i + 1 < len(EXTRA_DAEMON_ARGS):
            backend = EXTRA_DAEMON_ARGS[i + 1]
        elif a.startswith("--backend="):
            backend = a.split("=", 1)[1]
    return backend


def kv_element_bytes():
    """Bytes of one cached K or V element in the daemons under test: float32 on the CPU and with
    --fp32, bf16 on a GPU otherwise."""
    return 2 if daemon_backend() == "cuda" and "--fp32" not in EXTRA_DAEMON_ARGS else 4


class TestFailure(AssertionError):
    pass


def check(cond, msg="check failed"):
    if not cond:
        raise TestFailure(msg)


def ephemeral_low():
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A loopback port free now, drawn at random below the kernel's ephemeral range. A port the
    kernel handed out for bind(0) comes from the range it also gives every outgoing connection
    (the tests' gRPC clients, Open MPI's TCP links), so between its release here and the daemon's
    bind one of those could take it: the daemon then failed its start ("address in use")."""
    hi = ephemeral_low()
    lo = max(1024, hi - 20000)
    rng = random.SystemRandom()
    for _ in range(200 if hi > lo else 0):
        port = rng.randrange(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """One uncompd (or mpirun of R ranks) on a free loopback port, with its own folder (profile,
    log) and process group. `extra` are more daemon arguments (then EXTRA_DAEMON_ARGS);
    `env_defaults` are set where the environment does not already say, `env` always."""

    def __init__(self, daemon, mpirun, extra=(), np=1, name="daemon", prefix="uncomp_e2e_",
                 env_defaults=None, env=None, port=None):
        self.np = np
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.log_path = os.path.join(self.tmp, name + ".log")
        self._argv = (daemon, mpirun, list(extra))
        self._env = dict(os.environ)
        self._env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        for k, v in (env_defaults or {}).items():
            self._env.setdefault(k, v)
        self._env.update(env or {})
        self.log = open(self.log_path, "wb")
        self.respawns = 0
        self._spawn(port if port is not None else free_port())

    def _spawn(self, port):
        self.port = port
        self.addr = "127.0.0.1:%d" % port
        daemon, mpirun, extra = self._argv
        cmd = [daemon, "--listen", self.addr, "--profile", os.path.join(self.tmp, "profile.json"),
               "--drain-timeout", "20000"] + extra + EXTRA_DAEMON_ARGS
        if self.np > 1:
            cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(self.np)] + \
                cmd + ["--tp", str(self.np)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self._env, start_new_session=True)

    def respawn_on_port_clash(self, tries=3):
        """When the daemon has exited because its gRPC port was taken after free_port chose it,
        starts it again on another port (at most `tries` times) and returns True. Callers that
        address the daemon must read .addr after start-up."""
        if self.proc.poll() is None or self.respawns >= tries:
            return False
        self.log.flush()
        if not re.search(r"grpc: cannot listen on %s \(address in use" % re.escape(self.addr),
                         self.log_text()):
            return False
        self.respawns += 1
        self.log.write(b"[e2e] port %d was taken: starting again on another\n" % self.port)
        self.log.flush()
        self._spawn(free_port())
        return True

    def tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if not self.log.closed:
            self.log.close()

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

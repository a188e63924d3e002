"""Helpers shared by the end-to-end test scripts: assertions, free loopback ports and the daemon
process under test."""
import os
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


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """One uncompd (or mpirun of R ranks) on a free loopback port, with its own folder (profile,
    log) and process group. `extra` are more daemon arguments (then EXTRA_DAEMON_ARGS);
    `env_defaults` are set where the environment does not already say, `env` always."""

    def __init__(self, daemon, mpirun, extra=(), np=1, name="daemon", prefix="uncomp_e2e_",
                 env_defaults=None, env=None):
        self.np = np
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.log_path = os.path.join(self.tmp, name + ".log")
        cmd = [daemon, "--listen", self.addr, "--profile", os.path.join(self.tmp, "profile.json"),
               "--drain-timeout", "20000"] + list(extra) + EXTRA_DAEMON_ARGS
        if np > 1:
            cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(np)] + \
                cmd + ["--tp", str(np)]
        self.cmd = cmd
        full_env = dict(os.environ)
        full_env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        for k, v in (env_defaults or {}).items():
            full_env.setdefault(k, v)
        full_env.update(env or {})
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

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

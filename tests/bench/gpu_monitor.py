"""The GPU's clocks, power and temperature while a benchmark runs, from nvidia-smi's sampling
loop, summed up over a time window: whether a sustained load ran at the clocks a short
benchmark saw, or was held back by the power cap or heat.

    m = GpuMonitor(path)           # starts `nvidia-smi ... -lms 200`; samples also go to path
    t0 = time.time(); ...; line = m.summary(t0, time.time())
    m.stop()

Without nvidia-smi (or on a CPU host) every summary says so and nothing else changes.

    python3 gpu_monitor.py --record FILE   # the same sampling until SIGTERM (device_check.sh's
                                           # GPU_MONITOR=1, around each step)
    python3 gpu_monitor.py FILE            # the summary of everything FILE holds

FILE: a line per sample, "host seconds, " then nvidia-smi's csv line (FIELDS, the limits).
"""
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_trace import pct  # noqa: E402

FIELDS = ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu"]
# the name of the active-limits field changed between drivers
REASONS = ["clocks_event_reasons.active", "clocks_throttle_reasons.active"]
# bits of that field (nvml's nvmlClocksEventReasons)
REASON_BITS = {0x1: "idle", 0x2: "app-clocks", 0x4: "sw-power-cap", 0x8: "hw-slowdown",
               0x20: "sw-thermal", 0x40: "hw-thermal", 0x80: "hw-power-brake",
               0x100: "display-clocks"}


def parse(line):
    """(values of FIELDS, reasons bits) of one line of nvidia-smi's csv, or None."""
    parts = [x.strip() for x in line.split(",")]
    if len(parts) != len(FIELDS) + 1:
        return None
    try:
        return [float(x) for x in parts[:len(FIELDS)]], int(parts[-1], 16)
    except ValueError:
        return None


def load(path):
    """The samples of a file GpuMonitor wrote: (seconds, values, reasons)."""
    out = []
    with open(path) as f:
        for line in f:
            t, _, rest = line.partition(",")
            x = parse(rest)
            if x:
                out.append((float(t),) + x)
    return out


def summarize(s):
    """One line about samples (values, reasons)."""
    if not s:
        return "gpu: no samples in the window"
    col = lambda i: [x[0][i] for x in s]  # noqa: E731
    sm, mem, pw, temp = col(0), col(1), col(2), col(3)
    seen = 0
    for x in s:
        seen |= x[1]
    names = [n for b, n in sorted(REASON_BITS.items()) if seen & b and n != "idle"]
    capped = sum(1 for x in s if x[1] & 0x4) / len(s)
    return ("gpu (%d samples): SM clock median %.0f MHz (p10 %.0f, max %.0f), memory %.0f "
            "MHz, power median %.0f W (max %.0f), temperature max %.0f C; limits seen: %s; "
            "power-capped in %.0f%% of samples" % (
                len(s), statistics.median(sm), pct(sm, 0.1), max(sm),
                statistics.median(mem), statistics.median(pw), max(pw), max(temp),
                ", ".join(names) or "none", 100 * capped))


class GpuMonitor:
    def __init__(self, path, period_ms=200):
        self.path = path
        self.proc = None
        self.why = None
        exe = shutil.which("nvidia-smi")
        if not exe:
            self.why = "no nvidia-smi"
            return
        for reason in REASONS:
            q = ",".join(FIELDS + [reason])
            probe = subprocess.run([exe, "--query-gpu=" + q, "--format=csv,noheader,nounits",
                                    "-i", "0"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            if probe.returncode == 0:
                break
        else:
            self.why = "nvidia-smi query failed: " + probe.stdout.strip()[-200:]
            return
        self.f = open(path, "w")
        # each line: the host's time when it was read (nvidia-smi's own timestamp has no
        # sub-second part), then the fields
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=" + q, "--format=csv,noheader,nounits", "-i", "0",
             "-lms", str(period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1)
        self.samples = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            t = time.time()
            x = parse(line)
            if x:
                self.samples.append((t,) + x)
                self.f.write("%.3f, %s\n" % (t, line.strip()))

    def summary(self, t0, t1):
        """One line: medians (and the SM clock's spread) of the samples in [t0, t1]."""
        if self.proc is None:
            return "gpu: %s" % self.why
        return summarize([x[1:] for x in list(self.samples) if t0 <= x[0] <= t1])

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.thread.join(2)
            self.f.close()


def record(path):
    """Samples into path until SIGTERM or SIGINT."""
    m = GpuMonitor(path)
    if m.proc is None:
        print(m.summary(0, 0), file=sys.stderr)
        return
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    m.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--record":
        record(sys.argv[2])
    elif len(sys.argv) == 2:
        s = load(sys.argv[1]) if os.path.exists(sys.argv[1]) else []
        print(summarize([x[1:] for x in s]))
    else:
        sys.exit("usage: gpu_monitor.py [--record] FILE")

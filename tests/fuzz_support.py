"""Shared by the fuzz suites: the command line run under a memory limit and a timeout, and what they print
with LAYERDIFF_FUZZ_REPORT=1 (and ``-s``): cases per class and outcome, and the peak resident memory of
the command-line runs, largest first."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_limited_cli(args: list[str], cwd: Path, memory_limit: int, timeout: float) -> tuple[int, str, str, int, float]:
    """(exit code, stdout, stderr, peak RSS in bytes, seconds) of ``python -m layerdiff ARGS`` with its
    address space limited to ``memory_limit`` and killed after ``timeout`` s; a negative exit code is the
    signal that ended it. POSIX only (RLIMIT_AS, wait4)."""

    def limit_memory():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LAYERDIFF_FUZZ_REPORT": ""}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen([sys.executable, "-m", "layerdiff", *args], cwd=cwd, env=env, stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, preexec_fn=limit_memory)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    return proc.returncode, out, err, usage.ru_maxrss * 1024, seconds


def print_fuzz_report(counts: Mapping[str, Counter], peak_rss: Mapping[str, int] | None = None) -> None:
    if not os.environ.get("LAYERDIFF_FUZZ_REPORT"):
        return
    for name, c in sorted(counts.items()):
        print(f"\n{name}: {sum(c.values())} cases, {dict(c)}")
    for name, rss in sorted((peak_rss or {}).items(), key=lambda kv: -kv[1]):
        print(f"peak RSS {name}: {rss / 2**20:.0f} MiB")

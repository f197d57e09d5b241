"""What the fuzz suites print with LAYERDIFF_FUZZ_REPORT=1 (and ``-s``): cases per class and outcome, and
the peak resident memory of the command-line runs, largest first."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping


def print_fuzz_report(counts: Mapping[str, Counter], peak_rss: Mapping[str, int] | None = None) -> None:
    if not os.environ.get("LAYERDIFF_FUZZ_REPORT"):
        return
    for name, c in sorted(counts.items()):
        print(f"\n{name}: {sum(c.values())} cases, {dict(c)}")
    for name, rss in sorted((peak_rss or {}).items(), key=lambda kv: -kv[1]):
        print(f"peak RSS {name}: {rss / 2**20:.0f} MiB")

"""``gpipe plan`` of a 1.1-billion-parameter Llama built on the meta device: wall time and
memory growth of capture + cut + cost model + balance + every schedule simulated.

Memory growth is the process's peak resident set (``ru_maxrss``) at the end minus the
resident set after the imports (torch, transformers, gpipe) — what planning itself costs.

    python benchmarks/capture_plan_1b.py
"""

from __future__ import annotations

import contextlib
import io
import resource
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import transformers  # noqa: F401  (imports are not what is measured)

    from gpipe.cli.main import main as gpipe_main

    base = _rss_mib()
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = gpipe_main(
            ["plan", "--model", "examples.hf_models:llama_1b", "--stages", "4", "--chunks", "8",
             "--batch-size", "16"]
        )  # fmt: skip
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = out.getvalue().splitlines()
    print("\n".join(line for line in lines if line.startswith(("model:", "partition", "  stage"))))
    print(f"exit {code}; wall {wall:.1f} s; memory growth {peak - base:.0f} MiB "
          f"(RSS after imports {base:.0f} MiB, peak {peak:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()

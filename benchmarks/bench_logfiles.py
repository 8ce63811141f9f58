"""Cost of the log files: the logging thread's time per record and the writer's throughput.

    python benchmarks/bench_logfiles.py [N] [text|json]

N records (default 200,000) of 50 workers go to a fleet file (rotated at 10 MB, 3 kept) and
their group's file, through :class:`multibus.logfiles.LogFiles` as in ``multibus run``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from multibus.logfiles import LogFile, LogFiles


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    fmt = sys.argv[2] if len(sys.argv) > 2 else "text"
    with tempfile.TemporaryDirectory() as d:
        files = LogFiles(20, fmt, LogFile(f"{d}/fleet.log", 10_000_000, 3),
                         {"job": LogFile(f"{d}/job.log")}, counts={"job": 50},
                         max_queue=n).start()
        files.pid_of = lambda source: 4242
        msgs = [f"job.{i % 50} | job {i} done with some payload text" for i in range(n)]
        t0 = time.perf_counter()
        for m in msgs:
            files(m, 20)
        t1 = time.perf_counter()
        files.close(300)
        t2 = time.perf_counter()
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{fmt}: {n:,} records to 2 files: {1e6 * (t1 - t0) / n:.2f} us per record in "
              f"the logging thread; all written after {t2 - t0:.2f}s = {n / (t2 - t0):,.0f} "
              f"records/s; dropped {files.dropped}; {size / 1e6:.1f} MB in "
              f"{sorted(os.listdir(d))}")


if __name__ == "__main__":
    main()

"""`make bench`: every benchmark in this folder, one after another (each in its own process, so one benchmark's
threads, Ray instance or memory never affect the next one's figures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))


def main() -> None:
    failed = []
    for name in BENCHMARKS:
        print(f"\n# ===== benchmarks.{name} =====", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()

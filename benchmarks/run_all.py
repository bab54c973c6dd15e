"""`make bench`: every benchmark in this folder, one after another (each in its own process, so one benchmark's
threads, Ray instance or memory never affect the next one's figures), or the ones named on the command line."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = sorted(p.stem for p in HERE.glob("bench_*.py"))


def summary(name: str) -> str:
    """The first sentence of a benchmark's docstring (read, not imported: importing one loads torch)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or ""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    return re.split(r"(?<=[.?!:])\s", paragraph, maxsplit=1)[0].rstrip(".:")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all",
        description="Runs every benchmark in benchmarks/ (what `make bench` does), or the ones named, one after another,\n"
        "each in its own process; each prints its figures side by side with a baseline measured in the same run.",
        epilog="benchmarks (each also alone: python -m benchmarks.NAME --help):\n"
        + "\n".join(f"  {name:<18} {summary(name)}" for name in BENCHMARKS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run, e.g. bench_serve or serve (default: all of them)")
    args = parser.parse_args(argv)
    chosen = []
    for given in args.names:
        name = given if given.startswith("bench_") else f"bench_{given}"
        if name not in BENCHMARKS:
            parser.error(f"no benchmark named {given!r}; choose from {', '.join(BENCHMARKS)}")
        chosen.append(name)
    args.names = chosen or BENCHMARKS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    failed = []
    for name in args.names:
        print(f"\n# ===== benchmarks.{name} =====", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()

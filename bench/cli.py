"""Benchmark: how fast the commands that need no network start.

Times ``atlasq info``, ``atlasq atlas info`` and ``atlasq cell`` as new processes on a home that
``atlasq demo`` built (index and atlas ``sample``, the sample placed on it), ``--runs`` times each,
and, in the same run, two baselines: a bare ``python -c pass`` and ``python -c "import torch"``
(what these commands cost before they stopped importing torch). Medians, in seconds.

    python bench/cli.py --home HOME [--runs 5] [--cell 5,3]

Last lines: python_start_s=, torch_import_s=, info_start_s=, atlas_info_start_s=, cell_start_s=,
and each command's ratio to the torch import (below 1: faster than importing torch alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], runs: int) -> float:
    """Median wall time of ``command`` as a new process; it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", required=True, type=Path, help="A home that `atlasq demo` built.")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cell", default="5,3", help="A cell of the atlas's coarsest level.")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "atlasq.cli"]
    home = ["--home", str(args.home)]
    figures = {
        "python_start_s": timed([sys.executable, "-c", "pass"], args.runs),
        "torch_import_s": timed([sys.executable, "-c", "import torch"], args.runs),
        "info_start_s": timed(cli + ["info", "sample"] + home, args.runs),
        "atlas_info_start_s": timed(cli + ["atlas", "info", "sample"] + home, args.runs),
        "cell_start_s": timed(cli + ["cell", "--atlas", "sample", "--index", "sample", "--cell", args.cell] + home,
                              args.runs),
    }
    for name, value in figures.items():
        print(f"{name}={value:.3f}")
    for name in ("info_start_s", "atlas_info_start_s", "cell_start_s"):
        print(f"{name[:-2]}_to_torch_import={figures[name] / figures['torch_import_s']:.3f}")


if __name__ == "__main__":
    main()

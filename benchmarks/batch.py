"""Wall time of a 200-run rule-only sweep: 1 worker vs 2 local workers vs Ray on 2 CPUs.

    python benchmarks/batch.py [--points 10] [--replicates 20] [--steps 50] [--repeat 1] [--no-ray]

The sweep is scenarios/small_world_rules.toml (100 rule players on a small-world
graph, random matching, 5-round matches) over ``--points`` noise levels x
``--replicates`` seeds, ``--steps`` steps a run, no per-run charts or rounds.parquet.
Each way runs the same sweep into a fresh folder, end to end as ``run_sweep`` does
it (worker start-up, Ray start-up, results.parquet), without the report:

- 1 worker: in this process, one run after the other;
- 2 workers: a pool of 2 spawned processes;
- Ray: a local Ray instance with 2 CPUs, started by the sweep (its start-up is
  included and also shown on its own).

Start-up is also left out in extra rows: the pool's is timed as the same pool running
two one-step runs, Ray's as its ``ray.init``.

Overhead per run = (wall time x workers - the time the runs took inside the
workers) / runs: what parallel running costs beyond the runs themselves (start-up,
dispatch, results, idle workers at the end). The rows of every way are checked to
be the same.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from abm.batch import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(folder: Path, points: int, replicates: int, steps: int) -> Path:
    noise = [round(0.2 * i / max(1, points - 1), 4) for i in range(points)]
    path = folder / "bench_sweep.toml"
    path.write_text(
        f'scenario = "{ROOT / "scenarios" / "small_world_rules.toml"}"\nseed = 1\n'
        f"[set]\noutput.charts = false\noutput.rounds = false\npairing.steps = {steps}\n"
        f"[sweep]\nreplicates = {replicates}\ngame.noise = {noise}\n",
        encoding="utf-8",
    )
    return path


def timed_sweep(sweep, out: Path, **options) -> tuple[float, pd.DataFrame]:
    started = time.perf_counter()
    result = run_sweep(sweep, out, report=False, **options)
    wall = time.perf_counter() - started
    assert result.ok and len(result.ran) == len(sweep.runs), result.errors
    return wall, pd.read_parquet(out / "results.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--replicates", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every way this many times, interleaved; report the fastest",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep = load_sweep(sweep_file(folder, args.points, args.replicates, args.steps))
        n = len(sweep.runs)
        print(
            f"{n} runs ({args.points} noise levels x {args.replicates} seeds) of "
            f"small_world_rules.toml, {args.steps} steps each; {os.cpu_count()} cores"
        )
        ways = [
            ("1 worker (this process)", 1, {"backend": "local", "workers": 1}),
            ("2 workers (local processes)", 2, {"backend": "local", "workers": 2}),
        ]
        if not args.no_ray:
            ways.append(("Ray, local instance, 2 CPUs", 2, {"backend": "ray", "workers": 2}))
        best: dict[str, tuple] = {}
        ray_starts = []
        for repeat in range(args.repeat):
            for name, workers, options in ways:
                out = folder / f"{name}-{repeat}"
                if options["backend"] == "ray":
                    import ray

                    from abm.batch.ray_backend import connect

                    started = time.perf_counter()
                    connect(None, 2)
                    ray_starts.append(time.perf_counter() - started)
                    try:
                        wall, rows = timed_sweep(sweep, out, **options)
                    finally:
                        ray.shutdown()
                    wall += ray_starts[-1]
                else:
                    wall, rows = timed_sweep(sweep, out, **options)
                inside = float(rows["run_seconds"].sum())
                print(f"  {name}: {wall:.1f} s", flush=True)
                if name not in best or wall < best[name][2]:
                    best[name] = (name, workers, wall, inside, rows)
        # the pool's start-up: the same pool running one trivial run per worker
        (folder / "tiny").mkdir()
        tiny = load_sweep(sweep_file(folder / "tiny", 2, 1, 1))
        pool_start = min(
            timed_sweep(tiny, folder / f"tiny-{i}", backend="local", workers=2)[0]
            for i in range(args.repeat)
        )
        results = [best[name] for name, _, _ in ways]
        ray_start = min(ray_starts) if ray_starts else None

        first = results[0][4].drop(columns=["run_seconds"])
        for _name, *_, rows in results[1:]:
            pd.testing.assert_frame_equal(first, rows.drop(columns=["run_seconds"]))
        base = results[0][2]
        print()
        print("| way | wall time | vs 1 worker | time inside runs (sum) | overhead per run |")
        print("|---|---|---|---|---|")
        for name, workers, wall, inside, _ in results:
            overhead = (wall * workers - inside) / n * 1000
            print(
                f"| {name} | {wall:.1f} s | {base / wall:.2f}x | {inside:.1f} s | "
                f"{overhead:.0f} ms |"
            )
        name, workers, wall, inside, _ = results[1]
        wall -= pool_start
        overhead = (wall * workers - inside) / n * 1000
        print(
            f"| 2 workers, start-up left out | {wall:.1f} s | {base / wall:.2f}x | "
            f"{inside:.1f} s | {overhead:.0f} ms |"
        )
        if ray_start is not None:
            name, workers, wall, inside, _ = results[-1]
            wall -= ray_start
            overhead = (wall * workers - inside) / n * 1000
            print(
                f"| Ray, start-up left out | {wall:.1f} s | {base / wall:.2f}x | {inside:.1f} s "
                f"| {overhead:.0f} ms |"
            )
        if ray_start is not None:
            print(
                f"\nStart-up: the 2-process pool {pool_start:.1f} s (2 one-step runs), Ray's "
                f"ray.init of a local instance {ray_start:.1f} s (fastest). Every way gave the "
                "same results.parquet rows."
            )
        else:
            print(
                f"\nStart-up: the 2-process pool {pool_start:.1f} s (2 one-step runs). Every "
                "way gave the same results.parquet rows."
            )


if __name__ == "__main__":
    main()

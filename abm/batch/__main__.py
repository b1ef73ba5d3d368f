"""``python -m abm.batch SWEEP_FILE``: run a parameter sweep; ``... report DIR``: aggregate it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abm.errors import ScenarioError

USAGE = """python -m abm.batch SWEEP_FILE [--workers N] [--out DIR] [--backend local|ray]
                          [--address ADDR] [--set KEY.PATH=VALUE ...] [--force]
                          [--no-report] [--dry-run] [--quiet]
       python -m abm.batch report DIR [--no-charts]"""


def _sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m abm.batch",
        usage=USAGE,
        description="Run a scenario over a grid of parameters and seeds, in parallel, "
        "resumably; then aggregate the results and chart them.",
    )
    parser.add_argument("sweep", help="sweep TOML file, e.g. scenarios/sweep_noise.toml")
    parser.add_argument(
        "--out",
        help="output folder (default: outputs/<sweep name>); running "
        "the same command again resumes it",
    )
    parser.add_argument(
        "--workers", type=int, help="runs at once (default: one per core; 1 runs in this process)"
    )
    parser.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local processes (default) or Ray",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to join, HOST:PORT or ray://HOST:PORT "
        "(default: $RAY_ADDRESS, else a local Ray instance on 127.0.0.1)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a value in every run, like [set] in the sweep file (repeatable)",
    )
    parser.add_argument(
        "--force", action="store_true", help="run every run again, even those already complete"
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip aggregate.csv and the charts at the end"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and list the runs (seed, parameters) without running",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary lines")
    return parser


def _report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abm.batch report",
        description="Write aggregate.csv and the charts of a sweep output folder.",
    )
    parser.add_argument("dir", help="the sweep's output folder")
    parser.add_argument("--no-charts", action="store_true", help="aggregate.csv only")
    args = parser.parse_args(argv)
    from abm.batch.report import write_report

    try:
        files = write_report(Path(args.dir), charts=not args.no_charts)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {len(files)} files; aggregate: {files[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``python -m abm.batch`` command line.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 when every run succeeded, 1 when some run failed (recorded in
        results.parquet) or a worker was lost, 2 for a bad sweep file or folder, 130 when
        interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return _report_main(argv[1:])
    args = _sweep_parser().parse_args(argv)
    from abm.batch.backends import WorkerLost
    from abm.batch.keys import label
    from abm.batch.runner import run_sweep
    from abm.batch.sweep import load_sweep

    try:
        sweep = load_sweep(args.sweep, args.overrides)
        out = Path(args.out) if args.out else Path("outputs") / sweep.name
        if args.dry_run:
            print(
                f"{sweep.name}: {len(sweep.runs)} runs ({len(sweep.points)} points x "
                f"{sweep.replicates} replicates), master seed {sweep.seed}, base {sweep.base}"
            )
            for run in sweep.runs:
                print(
                    f"{run.run_id}\tseed={run.seed}\t"
                    + "  ".join(f"{k}={label(v)}" for k, v in run.params.items())
                )
            return 0
        result = run_sweep(
            sweep,
            out,
            backend=args.backend,
            workers=args.workers,
            force=args.force,
            address=args.address,
            quiet=args.quiet,
            report=not args.no_report,
        )
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerLost as exc:
        print(
            f"error: {exc}; the runs that finished are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted; the runs that finished are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if not args.quiet:
        print(
            f"{len(result.ran)} runs now ({len(result.failed)} failed), {result.skipped} "
            f"already complete; results: {result.out / 'results.parquet'}"
        )
        for run_id in result.failed[:5]:
            print(f"failed: {run_id}: {result.errors.get(run_id)}", file=sys.stderr)
        if len(result.failed) > 5:
            print(
                f"... {len(result.failed) - 5} more failed; see {result.out / 'errors.log'}",
                file=sys.stderr,
            )
    print(f"outputs: {result.out}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m abm.run SCENARIO``: run one scenario and write its output folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from abm.errors import ScenarioError
from abm.model import DilemmaModel
from abm.outputs import RunFolder, default_folder, write_results
from abm.records import TableWriter
from abm.scenario import load_scenario


def run_scenario(path: str | Path, *, out: str | Path | None = None, seed: int | None = None,
                 overrides: list[str] | None = None, quiet: bool = False) -> Path:
    """Load, validate, run and record a scenario; return the finished output folder."""
    started = time.perf_counter()
    scenario = load_scenario(path, overrides, seed)
    model = DilemmaModel(scenario, source=str(path))
    folder = RunFolder(Path(out) if out else default_folder(scenario.name))
    writer = TableWriter(folder.path, model.labels, model.played_label_of_node,
                         model.name_of_label,
                         rounds=scenario.output.rounds, matches=scenario.output.matches)
    decisions = tqdm(desc="LLM decisions", unit="decision", disable=quiet or not model.llm_policies,
                     leave=False, position=1)
    for policy in model.llm_policies:
        policy.progress = decisions  # an LLM step takes long enough to want its own bar
    try:
        for _ in tqdm(range(model.total_steps), desc=scenario.name, unit="step",
                      disable=quiet, leave=False, position=0):
            model.step()
            writer.add(model.last_result, model.last_totals,
                       [r for policy in model.llm_policies for r in policy.drain()])
        writer.close()
        summary = write_results(model, folder.path, time.perf_counter() - started,
                                with_charts=scenario.output.charts)
        final = folder.commit()
    except BaseException:
        writer.close()
        folder.discard()
        raise
    finally:
        decisions.close()
    if not quiet:
        print(f"{summary['steps']} steps, {summary['matches']} matches, "
              f"cooperation rate {summary['cooperation_rate']:.3f}, "
              f"simulated in {summary['wall_seconds']:.2f} s")
        for entry in summary.get("llm", []):
            print(llm_line(entry))
    for warning in summary.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    return final


def llm_line(entry: dict) -> str:
    """One line on how far an LLM player's choices are the model's own."""
    line = (f"{'/'.join(entry['players'])} ({entry['model']}, {entry['mode']}): "
            f"{entry['decisions']} decisions, {entry['invalid']} invalid "
            f"({entry['invalid_rate']:.1%})")
    if entry["fallbacks"]:
        line += f", {entry['fallbacks']} played by the fallback rule ({entry['fallback_rule']})"
    mass = entry.get("label_mass")
    if mass:
        line += f", label mass mean {mass['mean']:.2f} (min {mass['min']:.2f})"
    return line


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m abm.run",
        description="Run a repeated-dilemma scenario and write tables, summary and charts.")
    parser.add_argument("scenario", help="scenario TOML file, e.g. scenarios/round_robin_rules.toml")
    parser.add_argument("--out", help="output folder (default: outputs/<name>-<timestamp>)")
    parser.add_argument("--seed", type=int, help="master seed (overrides the scenario's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE",
                        help="override a scenario value, e.g. --set game.noise=0.05 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    args = parser.parse_args(argv)
    try:
        final = run_scenario(args.scenario, out=args.out, seed=args.seed,
                             overrides=args.overrides, quiet=args.quiet)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output folder was written", file=sys.stderr)
        return 130
    print(f"outputs: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m abm.run SCENARIO``: run one scenario and write its output folder.

Importing this module is cheap: the model, the tables (pandas, pyarrow), Mesa and
the charts are imported only when a run starts, after the command line has been
read, so ``--help`` and argument errors answer at once and a Ctrl-C during the
imports ends quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abm.errors import ScenarioError

if TYPE_CHECKING:  # imported for real by _import_heavy(), when a run starts
    from tqdm import tqdm

    from abm.model import DilemmaModel
    from abm.results import write_results
    from abm.run_folder import RunFolder, default_folder
    from abm.scenario import load_scenario
    from abm.table_writer import TableWriter

_HEAVY = {
    "tqdm": ("tqdm", "tqdm"),
    "DilemmaModel": ("abm.model", "DilemmaModel"),
    "RunFolder": ("abm.run_folder", "RunFolder"),
    "default_folder": ("abm.run_folder", "default_folder"),
    "write_results": ("abm.results", "write_results"),
    "TableWriter": ("abm.table_writer", "TableWriter"),
    "load_scenario": ("abm.scenario", "load_scenario"),
}


def _import_heavy() -> None:
    """Import what a run needs into this module.

    Names already set (by a test's monkeypatch, say) are kept.

    A Ctrl-C (or a SIGTERM, under main()) during these imports is noted and acted
    on once they are done, a second or so later, rather than raised inside them:
    some library code run at import catches every exception, a KeyboardInterrupt
    included, and a KeyboardInterrupt that passes through a C extension's import
    makes Python end the process by SIGINT at exit even after main() handled it.
    A second Ctrl-C interrupts at once.
    """
    seen: list[int] = []

    def note(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and seen.count(signum):
            raise KeyboardInterrupt
        seen.append(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, note)
        if signal.getsignal(signal.SIGTERM) is _terminate:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, note)
    try:
        for name, (module, attr) in _HEAVY.items():
            if name not in globals():
                globals()[name] = getattr(importlib.import_module(module), attr)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in seen:
        raise Terminated(signal.SIGTERM)
    if seen:
        raise KeyboardInterrupt


def __getattr__(name: str) -> Any:
    """``abm.run.write_results`` and the like still work, imported on first use."""
    if name in _HEAVY:
        _import_heavy()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Terminated(BaseException):
    """SIGTERM arrived.

    Raised by the handler main() installs, so that the run cleans up exactly as for
    Ctrl-C.
    """


def _disk_full(exc: BaseException) -> str | None:
    """'no space left on device' when ``exc`` says the disk (or quota) is full."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
        return "no space left on device"
    if exc.errno == errno.EDQUOT or "Disk quota exceeded" in str(exc):
        return "no space left on device (disk quota exceeded)"
    return None


def expected_llm_calls(model: DilemmaModel) -> int | None:
    """How many LLM decisions (plus reflections, where a policy reflects) a run will ask for.

    The count gives the progress bar a percentage and an ETA. It is None where it is
    not known in advance: geometric match lengths, random matching, evolution.
    Matches stopped early by an unreadable answer make the true count smaller.
    """
    scenario = model.scenario
    rounds = scenario.match.rounds
    population = model.population
    if (
        not population.llm_policies
        or rounds is None
        or model.evolution is not None
        or scenario.pairing.scheme not in ("all_edges", "round_robin")
    ):
        return None
    steps, pairing = model.total_steps, model.pairing
    total = 0
    for policy in population.llm_policies:
        index = population.policies.index(policy)
        sides = (population.policy_of_node[model.edges] == index).sum(axis=1)  # LLM sides per edge
        if scenario.pairing.scheme == "all_edges":
            per_run = int(sides.sum()) * steps
        else:  # one cycle of colours, repeated
            cycle = pairing.default_steps
            per_colour = [int(sides[pairing.colour == c].sum()) for c in range(cycle)]
            full, rest = divmod(steps, cycle)
            per_run = full * sum(per_colour) + sum(per_colour[:rest])
        params = getattr(policy, "params", None)
        calls = 2 if getattr(params, "reflection", False) else 1
        total += per_run * scenario.pairing.repetitions * rounds * calls
    return total


def run_scenario(
    path: str | Path,
    *,
    out: str | Path | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Load, validate, run and record a scenario; return the finished output folder.

    The output folder is claimed as soon as the scenario is valid (a second run
    into it is refused then); on any error or interrupt everything written is
    removed.

    Args:
        path: The scenario file.
        out: The output folder (default: ``outputs/<name>-<timestamp>``).
        seed: Overrides the scenario's seed.
        overrides: ``KEY.PATH=VALUE`` strings, as ``--set`` takes them.
        quiet: No progress bars and no summary line on stdout.

    Returns:
        The output folder, once complete.

    Raises:
        ScenarioError: A bad scenario or override, an output folder that is taken,
            or a full disk; the message says which.
    """
    _import_heavy()
    started = time.perf_counter()
    scenario = load_scenario(path, overrides, seed)
    folder = RunFolder(
        Path(out) if out else default_folder(scenario.name),
        what="--out" if out else "output folder",
    )
    writer = None
    model = None
    bars: list[Any] = []
    try:
        model = DilemmaModel(scenario, source=str(path))
        writer = TableWriter(
            folder.path,
            model.population,
            rounds=scenario.output.rounds,
            matches=scenario.output.matches,
        )
        # one step (a round robin) is the whole run: its bar would read 0/1 throughout
        show_steps = not quiet and model.total_steps > 1
        steps = tqdm(
            total=model.total_steps,
            desc=scenario.name,
            unit="step",
            disable=not show_steps,
            leave=False,
            position=0,
        )
        bars.append(steps)
        llm_policies = model.population.llm_policies
        if llm_policies:
            reflects = any(
                getattr(getattr(p, "params", None), "reflection", False) for p in llm_policies
            )
            calls = tqdm(
                total=expected_llm_calls(model),
                unit="call",
                disable=quiet,
                desc="LLM decisions + reflections" if reflects else "LLM decisions",
                leave=False,
                position=1 if show_steps else 0,
            )
            bars.append(calls)
            for policy in llm_policies:
                policy.progress = calls  # updated after each batch of decisions / reflections
        for _ in range(model.total_steps):
            model.step()
            writer.add(model.last_result, model.last_totals, model.last_exchanges)
            steps.update(1)
        writer.close()
        summary = write_results(
            model, folder.path, time.perf_counter() - started, with_charts=scenario.output.charts
        )
        final = folder.commit()
    except BaseException as exc:
        # the cleanup must not fail in its turn (a full disk fails the close again),
        # nor hide the first error
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        folder.discard()
        reason = _disk_full(exc)
        if reason:
            from abm.run_folder import _shown  # imported with the run already

            raise ScenarioError(
                f"{reason} while writing {_shown(folder.final)}; the partial "
                "outputs were removed; free some space or choose another --out "
                "on another disk"
            ) from None
        raise
    finally:
        for bar in bars:
            with contextlib.suppress(Exception):
                bar.close()
        _forget(model)
    if not quiet:
        print(
            f"{summary['steps']} steps, {summary['matches']} matches, "
            f"cooperation rate {summary['cooperation_rate']:.3f}, "
            f"simulated in {summary['wall_seconds']:.2f} s"
        )
        for entry in summary.get("llm", []):
            print(llm_line(entry))
    for warning in summary.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    return final


def _forget(model: Any) -> None:
    """Let a finished model go: Mesa keeps every model with agents in a class-level table.

    ``mesa.Agent`` counts agent ids per model in a dictionary keyed by the model and
    never emptied, which would keep each run's model, and through it its policies and
    their loaded LLMs, alive for as long as the process (a sweep worker) lives.
    """
    if model is None:
        return
    from mesa import Agent

    ids = getattr(Agent, "_ids", None)
    if isinstance(ids, dict):
        ids.pop(model, None)


def llm_line(entry: dict) -> str:
    """One line on how far an LLM player's choices are the model's own."""
    if entry.get("rule_teacher"):
        return (
            f"{'/'.join(entry['players'])} ({entry['model']}, {entry['mode']}): "
            f"{entry['decisions']} decisions made by the rule {entry['rule_teacher']} "
            "(rule_teacher), written as answers; none is the model's"
        )
    model = entry["model"] + (f" + adapter {entry['adapter']}" if entry.get("adapter") else "")
    line = (
        f"{'/'.join(entry['players'])} ({model}, {entry['mode']}): "
        f"{entry['decisions']} decisions, {entry['invalid']} invalid "
        f"({entry['invalid_rate']:.1%})"
    )
    if entry["fallbacks"]:
        line += f", {entry['fallbacks']} played by the fallback rule ({entry['fallback_rule']})"
    mass = entry.get("label_mass")
    if mass:
        line += f", label mass mean {mass['mean']:.2f} (min {mass['min']:.2f})"
    return line


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, 2 for bad input (one paragraph on stderr), 130 for
        Ctrl-C and 143 for SIGTERM (one line; whatever the run had written is removed).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted; no output folder was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); no output folder was written", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated(signum)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abm.run",
        description="Run a repeated-dilemma scenario and write tables, summary and charts.",
    )
    parser.add_argument(
        "scenario", help="scenario TOML file, e.g. scenarios/round_robin_rules.toml"
    )
    parser.add_argument("--out", help="output folder (default: outputs/<name>-<timestamp>)")
    parser.add_argument("--seed", type=int, help="master seed (overrides the scenario's)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a scenario value, e.g. --set game.noise=0.05 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    parser.add_argument(
        "--replicates",
        type=int,
        default=1,
        metavar="N",
        help="run N times with seeds seed, seed+1, ... into OUT/replicate-<i>/ "
        "and summarise them with 95%% intervals",
    )
    args = parser.parse_args(argv)
    if args.replicates < 1:
        parser.error("--replicates must be 1 or more")
    try:
        if args.replicates > 1:
            from abm.replicates import run_replicates

            final = run_replicates(
                args.scenario,
                args.replicates,
                out=args.out,
                seed=args.seed,
                overrides=args.overrides,
                quiet=args.quiet,
            )
        else:
            final = run_scenario(
                args.scenario,
                out=args.out,
                seed=args.seed,
                overrides=args.overrides,
                quiet=args.quiet,
            )
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"outputs: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

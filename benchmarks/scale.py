"""Time and peak memory of a rule-only run on a Barabasi-Albert graph.

    python benchmarks/scale.py                 # 100,000 agents, m = 2, all_edges,
                                               # 5 rounds, 20 steps
    python benchmarks/scale.py --agents 1000 10000 --steps 5
    python benchmarks/scale.py --phases        # the whole command at 10^3 .. 10^6 agents, by phase

Each size runs in a fresh process so peak memory (ru_maxrss) is its own.
Variants per size: ``naive`` (the same matches played one at a time by a
plain Python loop, one step only: the baseline), ``engine`` (the 20 steps of
the model alone, lockstep, build excluded), ``cli`` (the whole command without
the per-round table) and
``cli+rounds`` (with rounds.parquet). The naive loop's payoffs are checked
against the engine's before its time is reported.

``--phases`` runs the whole command (``run_scenario``, as ``python -m abm.run`` does,
charts on, no rounds.parquet) and splits its time: the graph (NetworkX), its edge
array, the population, the rest of the model's build, the engine, the tallies, the
rest of each step, the streamed tables (matches.csv), and the results (summary,
agents.csv, charts). The machine's load (``uptime``) is printed with the table, since
the times on a shared machine depend on it; ``cpu s`` (the process's user + system
time, imports included) does not: the streamed tables are written by a second thread
while the next step plays, so on two free cores the total is less than the CPU time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from abm.scenario import validate_scenario
    from abm.model import DilemmaModel
    from abm.run import run_scenario
    agents, steps, variant, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    data = {"name": "scale", "seed": 1, "graph": {"kind": "barabasi_albert", "n": agents, "m": 2},
            "population": {"mix": [{"policy": p, "share": 0.2} for p in
                           ("all_d", "all_c", "defect_once", "trigger", "tit_for_tat")]},
            "match": {"rounds": 5}, "pairing": {"scheme": "all_edges", "steps": steps},
            "output": {"rounds": variant == "cli+rounds", "charts": False}}
    t0 = time.perf_counter()
    if variant == "naive":
        model = DilemmaModel(validate_scenario({**data, "pairing": {"steps": 1}}),
                             collect_agents=False)
        t0 = time.perf_counter()
        totals = naive_step(model)
        seconds = time.perf_counter() - t0
        model.step()
        assert totals == model.last_totals["payoff"].tolist(), "naive loop disagrees"
        print(json.dumps({"seconds": seconds, "peak_mib": 0, "steps": 1}))
        raise SystemExit
    elif variant == "engine":
        model = DilemmaModel(validate_scenario(data), collect_agents=False)
        t0 = time.perf_counter()  # steps only: the build is timed by the cli variants
        while model.running:
            model.step()
    else:
        import tomli_w, pathlib
        if variant == "phases":
            data["output"]["charts"] = True
            phases = time_phases()
        path = pathlib.Path(out) / "scale.toml"
        path.write_text(tomli_w.dumps(data))
        t0 = time.perf_counter()
        run_scenario(path, out=pathlib.Path(out) / "run", quiet=True)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "steps": steps,
                      "cpu": usage.ru_utime + usage.ru_stime,
                      **({"phases": phases} if variant == "phases" else {})}))
""")

PHASES = textwrap.dedent("""
    def time_phases():
        # wrap the functions each phase runs in, and sum their times (a few calls a step)
        import functools
        import abm.model, abm.results, abm.engine, abm.tally, abm.table_writer
        from abm.population import Population
        phases = {}
        def timed(owner, name, phase, static=False):
            fn = getattr(owner, name)
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t
            setattr(owner, name, classmethod(lambda cls, *a, **k: wrapper(*a, **k))
                    if static else wrapper)
        timed(abm.model, "build_graph", "graph")
        timed(abm.model, "edge_array", "edge array")
        timed(Population, "from_specs", "population", static=True)
        timed(abm.model.DilemmaModel, "__init__", "model build")
        timed(abm.engine.Engine, "play", "engine")
        timed(abm.tally.Tally, "add", "tally")
        timed(abm.model.DilemmaModel, "step", "step")
        timed(abm.table_writer.TableWriter, "add", "tables")
        timed(abm.table_writer.TableWriter, "close", "tables")
        timed(abm.results, "write_results", "results")
        return phases
""")

# what each phase's time includes, from the wrapped functions: the model's build holds
# the graph, the edge array and the population; a step holds the engine and the tally
SHOWN = [
    ("graph", ()),
    ("edge array", ()),
    ("population", ()),
    ("build, rest", ("model build", "graph", "edge array", "population")),
    ("engine", ()),
    ("tally", ()),
    ("step, rest", ("step", "engine", "tally")),
    ("tables", ()),
    ("results", ()),
]

NAIVE = textwrap.dedent("""
    def naive_step(model):
        # one match at a time, one round at a time, strategies as Python branches
        table = [[9, 0], [10, 5]]
        names = model.policy_names
        def move(name, rnd, mine, theirs):
            if name == "all_c": return 0
            if name == "all_d": return 1
            if name == "defect_once": return 1 if rnd == 0 else 0
            if name == "trigger": return 1 if 1 in theirs else 0
            return theirs[-1] if theirs else 0  # tit_for_tat
        first, second = [], []
        for u, v in model.edges.tolist():
            hu, hv, pu, pv = [], [], 0, 0
            for rnd in range(5):
                a, b = move(names[u], rnd, hu, hv), move(names[v], rnd, hv, hu)
                hu.append(a); hv.append(b)
                pu += table[a][b]; pv += table[b][a]
            first.append(float(pu)); second.append(float(pv))
        return first + second
""")


def measure(agents: int, steps: int, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", NAIVE + PHASES + CHILD, str(agents), str(steps), variant, tmp],
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    """The machine's load averages as ``uptime`` prints them."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime: not available"


def show_phases(agents: list[int], steps: int) -> None:
    """The whole command's time per phase and in total, one row per size."""
    print(f"load before: {load()}")
    names = [name for name, _ in SHOWN]
    print(
        f"{'agents':>9} "
        + " ".join(f"{n:>11}" for n in names)
        + f" {'other':>8} {'total s':>8} {'cpu s':>8} {'peak MiB':>9}"
    )
    for n in agents:
        r = measure(n, steps, "phases")
        got = r["phases"]
        cells = []
        for name, parts in SHOWN:
            value = (
                got.get(parts[0], 0.0) - sum(got.get(p, 0.0) for p in parts[1:])
                if parts
                else got.get(name, 0.0)
            )
            cells.append(value)
        other = r["seconds"] - sum(cells)  # opening the folder, loading the scenario ...
        print(
            f"{n:>9,} "
            + " ".join(f"{c:>11.2f}" for c in cells)
            + f" {other:>8.2f} {r['seconds']:>8.2f} {r['cpu']:>8.2f} {r['peak_mib']:>9.0f}",
            flush=True,
        )
    print(f"load after: {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[100_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["naive", "engine", "cli", "cli+rounds"],
        choices=["naive", "engine", "cli", "cli+rounds"],
        help="leave out cli+rounds at 10^6 agents: 400 M rows, several GB",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="time the whole command by phase instead (default sizes: 10^3 to 10^6 agents)",
    )
    args = parser.parse_args()
    if args.phases:
        sizes = args.agents if "--agents" in sys.argv else [10**3, 10**4, 10**5, 10**6]
        show_phases(sizes, args.steps)
        return
    print(f"load: {load()}")
    print(
        f"{'agents':>9} {'edges':>9} {'variant':<11} {'seconds':>8} {'peak MiB':>9} "
        f"{'match-rounds/s':>15} {'vs naive':>9}"
    )
    for n in args.agents:
        edges = 2 * (n - 2)  # Barabasi-Albert with m = 2 adds m edges per new node
        base = None
        for variant in args.variants:
            r = measure(n, args.steps, variant)
            rate = edges * 5 * r["steps"] / r["seconds"]
            base = base or (rate if variant == "naive" else None)
            peak = f"{r['peak_mib']:>9.0f}" if r["peak_mib"] else f"{'-':>9}"
            print(
                f"{n:>9,} {edges:>9,} {variant:<11} {r['seconds']:>8.2f} {peak} "
                f"{rate:>15,.0f} {f'{rate / base:.1f}x' if base else '-':>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Time and peak memory of a rule-only run on a Barabasi-Albert graph.

    python benchmarks/scale.py                 # 100,000 agents, m = 2, all_edges, 5 rounds, 20 steps
    python benchmarks/scale.py --agents 1000 10000 --steps 5

Each size runs in a fresh process so peak memory (ru_maxrss) is its own.
Three variants per size: the engine alone (no tables), the full CLI path
without the per-round table, and the full CLI path with rounds.parquet.
The baseline printed first is an empty Python process with abm imported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

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
    if variant == "baseline":
        pass
    elif variant == "engine":
        model = DilemmaModel(validate_scenario(data), collect_agents=False)
        built = time.perf_counter() - t0
        while model.running:
            model.step()
    else:
        import tomli_w, pathlib
        path = pathlib.Path(out) / "scale.toml"
        path.write_text(tomli_w.dumps(data))
        run_scenario(path, out=pathlib.Path(out) / "run", quiet=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))
""")


def measure(agents: int, steps: int, variant: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(agents), str(steps), variant, tmp],
                             check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[100_000])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    base = measure(2, 1, "baseline")
    print(f"baseline (python + imports): {base['seconds']:.2f} s, {base['peak_mib']:.0f} MiB")
    print(f"{'agents':>9} {'edges':>9} {'variant':<11} {'seconds':>8} {'peak MiB':>9} "
          f"{'match-rounds/s':>15}")
    for n in args.agents:
        edges = 2 * (n - 2)  # Barabasi-Albert with m = 2 adds m edges per new node
        for variant in ("engine", "cli", "cli+rounds"):
            r = measure(n, args.steps, variant)
            rate = edges * 5 * args.steps / r["seconds"]
            print(f"{n:>9,} {edges:>9,} {variant:<11} {r['seconds']:>8.2f} "
                  f"{r['peak_mib']:>9.0f} {rate:>15,.0f}", flush=True)


if __name__ == "__main__":
    main()

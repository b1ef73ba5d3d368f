"""Evolution at scale: N agents x G generations of a strategy-update rule.

Default: 10,000 agents on a Barabasi-Albert graph (m = 2), single-round weak
Prisoner's Dilemma (R = 1, T = b = 1.5, S = P = 0), half cooperators, the
`proportional` rule (Santos & Pacheco 2005), 10,000 generations. Prints the
wall time, generations per second, and how the time splits between playing
the step (engine) and the strategy update, with peak memory.

    python benchmarks/evolution.py [--agents N] [--generations G] [--rule R]
"""

from __future__ import annotations

import argparse
import resource
import time

from tqdm import tqdm

from abm.model import DilemmaModel
from abm.scenario import validate_scenario


def build(agents: int, generations: int, rule: str, seed: int) -> DilemmaModel:
    return DilemmaModel(
        validate_scenario(
            {
                "seed": seed,
                "game": {"kind": "custom", "R": 1, "T": 1.5, "S": 0, "P": 0},
                "match": {"rounds": 1},
                "graph": {"kind": "barabasi_albert", "n": agents, "m": 2},
                "population": {
                    "mix": [{"policy": "all_c", "share": 0.5}, {"policy": "all_d", "share": 0.5}]
                },
                "pairing": {"scheme": "all_edges", "steps": generations},
                "evolution": {"rule": rule},
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--generations", type=int, default=10_000)
    parser.add_argument("--rule", default="proportional")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    model = build(args.agents, args.generations, args.rule, args.seed)
    evolve = model.evolution.update
    spent = [0.0]

    def timed(*args):
        t = time.perf_counter()
        out = evolve(*args)
        spent[0] += time.perf_counter() - t
        return out

    model.evolution.update = timed
    started = time.perf_counter()
    for _ in tqdm(range(args.generations), unit="gen", leave=False):
        model.step()
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    coop = model.tally.steps[-1]["share:all_c"]
    print(
        f"{args.agents:,} agents, {len(model.edges):,} edges, {args.generations:,} generations "
        f"of {args.rule}"
    )
    print(
        f"  wall            {wall:9.1f} s   ({args.generations / wall:,.0f} generations/s, "
        f"{wall / args.generations * 1e3:.2f} ms each)"
    )
    print(f"  of which update {spent[0]:9.1f} s   ({spent[0] / wall:.0%})")
    print(f"  peak memory     {peak:9.0f} MiB")
    print(f"  cooperators at the end: {coop:.3f}")


if __name__ == "__main__":
    main()

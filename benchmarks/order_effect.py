"""How much the option order and the labels move an LLM's measured choice.

    python benchmarks/order_effect.py [--model smollm2-135m-instruct] [--mode score]

Runs scenarios/round_robin.toml (reflections off) once per presentation:
police framing with "remain silent" shown first and with "testify" first, and
the neutral framing with J = C and J = D, each in both orders. For each it
prints the mean P(cooperate) in round 1 (one prompt: nothing has happened
yet), the mean P(cooperate) and share of C decisions over all 35 decisions,
and the label mass. A model whose choice is its own gives the same numbers in
every row; the spread between rows is the presentation's effect.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import tomli_w

from abm.llm.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
PRESENTATIONS = [
    ("police, silent first", {"framing": "police", "option_order": "fixed"}),
    ("police, testify first", {"framing": "police", "option_order": "reversed"}),
    ("neutral J=C, J first", {"framing": "neutral", "option_order": "fixed"}),
    ("neutral J=C, F first", {"framing": "neutral", "option_order": "reversed"}),
    (
        "neutral J=D, F first",
        {"framing": "neutral", "label_assignment": "swapped", "option_order": "fixed"},
    ),
    (
        "neutral J=D, J first",
        {"framing": "neutral", "label_assignment": "swapped", "option_order": "reversed"},
    ),
]


def run(model: str, mode: str, keys: dict, folder: Path) -> list[dict]:
    from abm.run import run_scenario

    data = tomllib.loads((ROOT / "scenarios" / "round_robin.toml").read_text())
    data["population"]["players"][-1].update(model=model, mode=mode, reflection=False, **keys)
    path = folder / "scenario.toml"
    path.write_text(tomli_w.dumps(data))
    out = run_scenario(path, out=folder / "run", quiet=True)
    return [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--mode", default="score", choices=["score", "generate"])
    args = parser.parse_args()
    print(f"model {args.model}, {args.mode} mode, round_robin.toml without reflections")
    print(
        f"{'presentation':<24} {'P(C) round 1':>12} {'mean P(C)':>10} {'C share':>8} "
        f"{'invalid':>8} {'label mass':>10}"
    )
    for name, keys in PRESENTATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            records = run(args.model, args.mode, keys, Path(tmp))
        valid = [r for r in records if r["valid"]]
        first = [r for r in valid if r["round"] == 1]
        pc = "p_cooperate" if args.mode == "score" else None

        def mean_pc(rows, pc=pc):
            if not rows:
                return float("nan")
            return float(np.mean([r[pc] if pc else r["action"] == "C" for r in rows]))

        mass = [r["label_mass"] for r in records if "label_mass" in r]
        print(
            f"{name:<24} {mean_pc(first):>12.3f} {mean_pc(valid):>10.3f} "
            f"{np.mean([r['action'] == 'C' for r in valid]) if valid else float('nan'):>8.2f} "
            f"{1 - len(valid) / len(records):>8.0%} "
            f"{np.mean(mass) if mass else float('nan'):>10.2f}"
        )


if __name__ == "__main__":
    main()

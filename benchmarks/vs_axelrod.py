"""abm against the Axelrod library: the same round-robin tournaments, payoffs and speed.

    pip install "abm[bench]"
    python benchmarks/vs_axelrod.py [--quick]

1. Cross-check: every abm rule strategy with an Axelrod twin (and Defect Once,
   written here as a small Axelrod player), self-play included, payoffs
   9/0/10/5 and Axelrod's 3/0/5/1, 5 and 200 rounds. Without noise the payoff
   matrices must be equal to the last digit; with noise 0.05 (and for the
   stochastic strategies) every cell's mean must agree within 4.5 standard
   errors over the repetitions.
2. Speed: both libraries time the same tournaments in this process (median of
   3), reported as match-rounds per second and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import axelrod as axl
import numpy as np

from abm.model import DilemmaModel
from abm.scenario import validate_scenario


class DefectOnce(axl.Player):
    """abm's defect_once for Axelrod: D in the first round, then C."""

    name = "Defect Once"
    classifier = {
        "memory_depth": 0,
        "stochastic": False,
        "long_run_time": False,
        "inspects_source": False,
        "manipulates_source": False,
        "manipulates_state": False,
    }

    def strategy(self, opponent):
        return axl.Action.D if not self.history else axl.Action.C


TWINS = {  # abm name -> Axelrod player factory
    "all_c": axl.Cooperator,
    "all_d": axl.Defector,
    "defect_once": DefectOnce,
    "trigger": axl.Grudger,
    "tit_for_tat": axl.TitForTat,
    "suspicious_tit_for_tat": axl.SuspiciousTitForTat,
    "tit_for_two_tats": axl.TitFor2Tats,
    "win_stay_lose_shift": axl.WinStayLoseShift,
    "alternator": axl.Alternator,
    "generous_tit_for_tat": axl.GTFT,
    "random": axl.Random,
}
EXPERIMENT = ["all_d", "all_c", "defect_once", "trigger", "tit_for_tat"]


def forgiveness(payoffs) -> float:
    """GTFT's default, min(1 - (T-R)/(R-S), (R-P)/(T-P)), for these payoffs.

    Both libraries use this formula, but Axelrod's GTFT fixes it with the
    default game (3/0/5/1, giving 1/3) when it is built, before a match tells it
    the real game; abm uses the scenario's game. So the cross-check gives the
    value explicitly to both, and the README says so.
    """
    r, s, t, p = payoffs
    return min(1 - (t - r) / (r - s), (r - p) / (t - p))


def abm_spec(name, payoffs):
    if name == "generous_tit_for_tat":
        return {"name": name, "label": name, "g": forgiveness(payoffs)}
    return {"name": name, "label": name}


def axelrod_player(name, payoffs):
    if name == "generous_tit_for_tat":
        return axl.GTFT(p=forgiveness(payoffs))
    return TWINS[name]()


STOCHASTIC = {"generous_tit_for_tat", "random"}


def abm_tournament(names, rounds, reps, payoffs, noise, seed=1):
    """(mean matrix, per-match totals by cell) from abm; one repetition per step."""
    r, s, t, p = payoffs
    data = {
        "seed": seed,
        "game": {"kind": "custom", "R": r, "S": s, "T": t, "P": p, "noise": noise},
        "match": {"rounds": rounds},
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": [abm_spec(n, payoffs) for n in names]},
        "pairing": {"scheme": "all_edges", "steps": reps},
    }
    model = DilemmaModel(validate_scenario(data), collect_agents=False)
    cells: dict[tuple[int, int], list[float]] = {}
    while model.running:
        model.step()
        res, pay = model.last_result, model.last_totals["payoff"]
        for a, b, v in zip(res.agent, res.opponent, pay, strict=True):
            cells.setdefault((int(a), int(b)), []).append(float(v))
    return model.tally.payoff_matrix().to_numpy(), cells


def axelrod_tournament(names, rounds, reps, payoffs, noise, seed=1):
    """The same tournament, match by match with axelrod.Match."""
    game = axl.Game(*payoffs)
    players = [axelrod_player(n, payoffs) for n in names]
    cells: dict[tuple[int, int], list[float]] = {}
    k = 0
    for i in range(len(names)):
        for j in range(i, len(names)):
            for _ in range(reps):
                k += 1
                match = axl.Match(
                    (players[i].clone(), players[j].clone()),
                    turns=rounds,
                    game=game,
                    noise=noise,
                    seed=seed + k,
                )
                match.play()
                a, b = match.final_score()
                cells.setdefault((i, j), []).append(a)
                cells.setdefault((j, i), []).append(b)
    n = len(names)
    return np.array([[np.mean(cells[(i, j)]) for j in range(n)] for i in range(n)]), cells


def cross_check(names, rounds, payoffs, noise, reps) -> str:
    exact = noise == 0 and not STOCHASTIC & set(names)
    ours, our_cells = abm_tournament(names, rounds, 1 if exact else reps, payoffs, noise)
    theirs, their_cells = axelrod_tournament(names, rounds, 1 if exact else reps, payoffs, noise)
    if exact:
        equal = np.array_equal(ours, theirs)
        return "equal to the last digit" if equal else f"DIFFERENT:\n{ours}\n{theirs}"
    worst = 0.0
    for key, values in our_cells.items():
        a, b = np.array(values), np.array(their_cells[key])
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        if se > 0:
            worst = max(worst, abs(a.mean() - b.mean()) / se)
        elif a.mean() != b.mean():
            worst = float("inf")
    verdict = "agree" if worst < 4.5 else "DISAGREE"
    return f"{verdict}: largest cell difference {worst:.2f} standard errors over {reps} reps"


def timed(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(names, rounds, reps, payoffs, noise) -> tuple[float, float]:
    n = len(names)
    match_rounds = n * (n + 1) // 2 * rounds * reps
    r, s, t, p = payoffs
    data = {
        "seed": 1,
        "game": {"kind": "custom", "R": r, "S": s, "T": t, "P": p, "noise": noise},
        "match": {"rounds": rounds},
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": [abm_spec(x, payoffs) for x in names]},
        "pairing": {"scheme": "all_edges", "steps": 1, "repetitions": reps},
    }

    def ours():  # every repetition of every pair in one lockstep batch
        model = DilemmaModel(validate_scenario(data), collect_agents=False)
        while model.running:
            model.step()
        return model.tally.payoff_matrix()

    def theirs():
        axl.Tournament(
            [axelrod_player(x, payoffs) for x in names],
            turns=rounds,
            repetitions=reps,
            game=axl.Game(*payoffs),
            noise=noise,
            seed=1,
        ).play(progress_bar=False, build_results=False, processes=1)

    return match_rounds / timed(ours), match_rounds / timed(theirs)


def main() -> None:
    warnings.filterwarnings("ignore", message="Tournament results will not be accessible")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    everyone = list(TWINS)
    deterministic = [n for n in everyone if n not in STOCHASTIC]
    reps = 300 if args.quick else 2000
    print("Cross-check (abm vs axelrod.Match), all strategies with twins, self-play included")
    for payoffs in ((9, 0, 10, 5), (3, 0, 5, 1)):
        for rounds in (5, 200):
            print(
                f"  payoffs {payoffs}, {rounds} rounds, no noise, deterministic: "
                f"{cross_check(deterministic, rounds, payoffs, 0.0, 1)}"
            )
            n = reps if rounds == 5 else reps // 10
            check = cross_check(everyone, rounds, payoffs, 0.05, n)
            print(f"  payoffs {payoffs}, {rounds} rounds, noise 0.05, all: {check}")
    print("\nSpeed (median of 3), match-rounds per second")
    workloads = [
        ("the experiment: 5 strategies x 1,000 reps, 5 rounds", EXPERIMENT, 5, 1000, 0.0),
        (
            "10 strategies x 200 rounds x 20 reps, noise 0.05",
            [n for n in everyone if n != "defect_once"],
            200,
            20,
            0.05,
        ),
    ]
    print(f"  {'workload':<52} {'abm':>12} {'axelrod':>10} {'ratio':>7}")
    for label, names, rounds, reps_, noise in workloads:
        ours, theirs = speed(names, rounds, reps_, (9, 0, 10, 5), noise)
        print(f"  {label:<52} {ours:>12,.0f} {theirs:>10,.0f} {ours / theirs:>6.0f}x", flush=True)


if __name__ == "__main__":
    main()

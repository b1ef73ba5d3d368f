"""A run's output folder: written under a temporary name, renamed when complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from abm import __version__, charts
from abm.atomic import HOST, pid_alive, remove_stale_partials
from abm.errors import ScenarioError
from abm.game import EMPTY
from abm.model import DilemmaModel


def default_folder(name: str, root: Path = Path("outputs")) -> Path:
    """``outputs/<name>-<timestamp>``, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"{name}-{stamp}"
    n = 2
    while folder.exists():
        folder = root / f"{name}-{stamp}-{n}"
        n += 1
    return folder


RUNNING = ".running"
# what the hidden working copy adds to the folder's name: "." + ".partial-" + a PID
_PARTIAL_EXTRA = 1 + len(".partial-") + 7


def _shown(path: Path | str | bytes) -> str:
    """A path as one line of text: control characters (a newline, a NUL) escaped."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text if text.isprintable() else repr(text)


def _reason(exc: OSError) -> str:
    """What went wrong, in words, for the errors folder creation can hit."""
    reasons = {
        errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system", errno.ENAMETOOLONG: "a name in the path is too long",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a part of the path is a file, not a folder",
        errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
        errno.ELOOP: "too many symbolic links",
    }
    reason = reasons.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"{reason} ({_shown(exc.filename)})" if exc.filename else reason


class RunFolder:
    """The folder appears under its final name only once everything is in it, so a
    crash or an error never leaves a folder that looks complete.

    The final folder is claimed at once: it is created empty (or an existing empty
    folder is taken) and holds only a ``.running`` file with the PID of the run, so
    a second run into the same folder is refused before it starts; a claim whose
    PID no longer runs (a killed run) is taken over. The tables are written to a
    hidden ``.NAME.partial-PID`` folder beside it, which replaces the claimed
    folder in one rename when complete. Hidden partial folders of dead runs in the
    same parent are removed when a run starts.
    """

    def __init__(self, final: Path, what: str = "--out") -> None:
        self.final = final
        self.what = what
        self.path = final.parent / f".{final.name}.partial-{os.getpid()}"
        self.marker = final / RUNNING
        self.created = False  # this run made ``final``: a discard removes it again
        self.claimed = False  # this run wrote ``.running``
        self.made_parents: list[Path] = []
        where = f"{what} {_shown(final)}"
        if "\0" in str(final):
            raise ScenarioError(f"{where}: the path contains a NUL byte; allowed: a folder "
                                "path without NUL characters")
        try:
            self._check_name_length()
            self._claim()
            remove_stale_partials(final.parent)
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir()
            # whose it is: a run on another machine sharing this folder is not ours to judge
            (self.path / HOST).write_text(socket.gethostname(), encoding="utf-8")
        except ScenarioError:
            self.discard()
            raise
        except (OSError, ValueError) as exc:
            self.discard()
            reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
            raise ScenarioError(f"{where}: cannot create the output folder: {reason}; "
                                "choose a folder you can write to, e.g. --out runs/NAME") from None

    def _check_name_length(self) -> None:
        try:
            limit = os.pathconf(self.final.parent if self.final.parent.is_dir() else ".",
                                "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        size = len(os.fsencode(self.final.name))
        if size + _PARTIAL_EXTRA > limit:
            raise ScenarioError(
                f"{self.what} {_shown(self.final)}: the folder name is {size} bytes long; "
                f"allowed: at most {limit - _PARTIAL_EXTRA} bytes (the file system allows "
                f"{limit}, and the run first writes to a hidden '.NAME.partial-PID' folder)")

    def _claim(self) -> None:
        final, where = self.final, f"{self.what} {_shown(self.final)}"
        if final.parent.exists() and not final.parent.is_dir():
            raise ScenarioError(f"{where}: {_shown(final.parent)} is a file, not a folder; "
                                "choose a folder path")
        missing = []  # the parent folders this run makes: removed again on discard
        if final.is_symlink():  # the rename at the end would replace the link, not its folder
            raise ScenarioError(f"{where}: is a symbolic link; give the folder it points to "
                                f"({_shown(final.resolve())}) or another folder")
        for folder in final.parents:
            if folder.exists():
                break
            missing.append(folder)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.made_parents = missing
        try:
            os.mkdir(final)
            self.created = True
        except FileExistsError:
            if not final.is_dir():
                raise ScenarioError(f"{where}: already exists and is a file, not a folder; "
                                    "remove it or choose another folder") from None
        for _ in range(3):
            others = [p.name for p in final.iterdir() if p.name != RUNNING]
            if others:
                raise ScenarioError(f"{where}: already exists and is not empty; remove it or "
                                    "choose another folder")
            try:
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _live_claim(self.marker)
                if owner is not None:
                    raise ScenarioError(
                        f"{where}: another run ({owner}) is writing to this folder now "
                        f"(it holds {RUNNING}); wait for it to finish or choose another "
                        "folder") from None
                self.marker.unlink(missing_ok=True)  # a claim of a run that died: take it
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.claimed = True
            return
        raise ScenarioError(f"{where}: other runs are claiming this folder at the same "
                            "time; choose another folder")

    def commit(self) -> Path:
        """Put the finished folder in place of the claim, in one rename."""
        (self.path / HOST).unlink(missing_ok=True)  # bookkeeping, not an output
        try:
            self.marker.unlink(missing_ok=True)
            self.claimed = False
            try:  # rename(2) replaces an empty folder atomically
                os.replace(self.path, self.final)
            except OSError:
                if not self.final.is_dir() or any(self.final.iterdir()):
                    raise
                self.final.rmdir()
                os.replace(self.path, self.final)
        except OSError as exc:
            # the outputs are complete: keep them in sight rather than discard them
            kept = self.final.with_name(f"{self.final.name}.finished-{os.getpid()}")
            try:
                os.replace(self.path, kept)
            except OSError:
                kept = None
            where = (f"; the finished outputs are in {_shown(kept)}" if kept else "")
            raise ScenarioError(f"{self.what} {_shown(self.final)}: cannot move the finished "
                                f"outputs into place: {_reason(exc)}{where}") from None
        self.created = False
        self.made_parents = []
        return self.final

    def discard(self) -> None:
        """Remove everything this run wrote; never raises."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.claimed:
            with contextlib.suppress(OSError):
                self.marker.unlink()
            self.claimed = False
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.final)  # only while empty: never anyone else's files
            self.created = False
        for folder in self.made_parents:  # deepest first; only those still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.made_parents = []


def _live_claim(marker: Path, grace: float = 30.0) -> str | None:
    """Who holds a ``.running`` claim ("PID 123") while that process runs; None when
    the claim is stale. A claim without a readable PID is being written, or was by
    a run that died at once: it counts as live for ``grace`` seconds."""
    try:
        text = marker.read_text(encoding="utf-8").strip()
        age = time.time() - marker.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None
    pid, _, host = text.partition(" ")
    if not pid.isdigit():
        return "PID not yet written" if age < grace else None
    if host and host != socket.gethostname():  # its PID means nothing here
        return f"PID {pid} on {host}"
    return f"PID {pid}" if pid_alive(int(pid)) else None


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _evolution_summary(model: DilemmaModel, steps: pd.DataFrame) -> dict[str, Any]:
    """Final shares (after the last update) and shares averaged over the last N steps."""
    last = model.scenario.evolution.average_last
    window = steps.tail(last)
    return {
        "rule": model.scenario.evolution.rule,
        "average_last": last,
        "final_shares": dict(zip(model.labels, map(float, model.shares()))),
        "mean_shares": {label: float(window[f"share:{label}"].mean()) for label in model.labels},
    }


def _write_snapshots(model: DilemmaModel, folder: Path) -> None:
    """Who held which label on the lattice at each snapshot: steps (S,), grid (S, rows, cols)."""
    steps = np.array([s for s, _ in model.snapshots], np.int64)
    grid = np.stack([g.reshape(model.grid_shape) for _, g in model.snapshots]).astype(np.int32)
    np.savez_compressed(folder / "snapshots.npz", steps=steps, grid=grid,
                        labels=np.array(model.labels))


def _llm_summary(model: DilemmaModel, policy: Any, counts: pd.DataFrame) -> dict[str, Any]:
    """A policy's own statistics plus its invalid rate against each opponent."""
    index = model.policies.index(policy)
    labels = [label for label, p in zip(model.labels, model.policy_of_label) if p == index]
    rows = counts[counts["player"].isin(labels)]
    by_opponent = {
        opponent: {"decisions": int(g["decisions"].sum()), "invalid": int(g["invalid"].sum()),
                   "fallbacks": int(g["fallbacks"].sum()),
                   "invalid_rate": float(g["invalid"].sum() / g["decisions"].sum()),
                   "void_matches": int(g["void_matches"].sum())}
        for opponent, g in rows.groupby("opponent", sort=False)}
    return {"players": labels, **policy.stats(), "by_opponent": by_opponent}


def _degrees(edges: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per node: the number of distinct other neighbours, and whether it has a
    self-loop (self-play), which is not counted in the degree."""
    loop = edges[:, 0] == edges[:, 1]
    pairs = np.unique(np.sort(edges[~loop], axis=1), axis=0) if (~loop).any() else edges[:0]
    degree = np.bincount(pairs.ravel(), minlength=n_nodes)
    self_loop = np.zeros(n_nodes, bool)
    self_loop[edges[loop, 0]] = True
    return degree, self_loop


def _heatmap_subtitle(model: DilemmaModel) -> str:
    """Under what the heatmaps were measured: match length, noise, n per cell, models."""
    scenario = model.scenario
    match = scenario.match
    length = (f"{match.rounds} rounds per match" if match.rounds is not None else
              f"geometric match length, continuation p = {match.continuation_probability:g}")
    k = len(model.labels)
    # complete matches behind each cell; on the diagonal both sides of a match fall
    # in the same cell, so they are counted once
    n = model.tally.pair_matches.reshape(k, k).astype(float)
    n[np.diag_indices(k)] /= 2
    n = [int(x) for x in np.ceil(n[n > 0])]
    lo, hi = (min(n), max(n)) if n else (0, 0)
    cells = ("no complete match" if not n else f"{lo} match{'es' * (lo != 1)} per cell"
             if lo == hi else f"{lo}-{hi} matches per cell")
    parts = [length, f"noise {scenario.game.noise:g}", cells]
    models = list(dict.fromkeys(str(getattr(getattr(p, "params", None), "model", "?"))
                                for p in model.llm_policies))
    if models:
        parts.append("LLM: " + ", ".join(models))
    return "; ".join(parts)


def _cooperation_by_round(result: Any) -> pd.DataFrame | None:
    """Share of C among the actual actions of each round of one step."""
    if result is None or result.actual.size == 0:
        return None
    actual = result.actual
    played = (actual != EMPTY).sum(axis=1)
    coop = (actual == 0).sum(axis=1)
    keep = played > 0
    return pd.DataFrame({"round": np.arange(1, len(actual) + 1)[keep],
                         "cooperation_rate": coop[keep] / played[keep]})


def _llm_behaviour(model: DilemmaModel, folder: Path,
                   summary: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Round-by-round tables and memory-one fingerprints of the LLM players, from the
    run's own rounds.parquet and transcripts: llm_rounds.csv, llm_fingerprints.csv and
    a ``behaviour`` block per LLM entry of the summary. None without rounds.parquet."""
    from abm import behaviour as bh
    from abm.policies.rules import default_generosity

    path = folder / "rounds.parquet"
    if not path.is_file():
        for entry in summary["llm"]:
            entry["behaviour"] = "not computed: output.rounds = false"
        return None
    frame = bh.run_decisions(folder)
    g = default_generosity(model.scenario.game.payoffs)
    # not a dilemma: Nowak & Sigmund's usual 1/3
    strategies = bh.classic_strategies(1 / 3 if g is None else g)
    tables, prints = [], []
    for entry in summary["llm"]:
        entry["behaviour"] = {}
        for player in entry["players"]:
            mine = frame[frame["player"] == player]
            if mine.empty:  # a mutant that never appeared, say: nothing to describe
                entry["behaviour"][player] = "no decisions"
                continue
            tables.append(bh.round_by_round(frame, player))
            pooled = bh.fingerprint(mine)
            prints.append(pooled.table.reset_index().assign(player=player, opponent="all"))
            by_opponent = {}
            for opponent, part in mine.groupby("opponent_player", sort=False):
                fp = bh.fingerprint(part)
                by_opponent[str(opponent)] = fp.to_dict(strategies)
                prints.append(fp.table.reset_index().assign(player=player, opponent=opponent))
            entry["behaviour"][player] = {"fingerprint": pooled.to_dict(strategies),
                                          "fingerprint_by_opponent": by_opponent,
                                          "sequences": bh.sequences(frame, player)}
    if not tables:
        return None
    rounds_table = pd.concat(tables, ignore_index=True)
    prints_table = pd.concat(prints, ignore_index=True)
    rounds_table.to_csv(folder / "llm_rounds.csv", index=False)
    prints_table.to_csv(folder / "llm_fingerprints.csv", index=False)
    return rounds_table, prints_table


def write_results(model: DilemmaModel, folder: Path, wall_seconds: float,
                  with_charts: bool = True) -> dict[str, Any]:
    """Everything but the streamed tables: config, matrices, summary, agents, charts."""
    scenario = model.scenario
    (folder / "config.toml").write_text(tomli_w.dumps(scenario.to_toml_dict()), encoding="utf-8")
    tally = model.tally
    payoff, defections = tally.payoff_matrix(), tally.defection_matrix()
    payoff.to_csv(folder / "payoff_matrix.csv")
    defections.to_csv(folder / "defections.csv")
    steps = pd.DataFrame(tally.steps)
    steps["step"] += 1
    steps.to_csv(folder / "steps.csv", index=False)
    degree, self_loop = _degrees(model.edges, model.n_nodes)
    agents = pd.DataFrame({
        "agent": np.arange(model.n_nodes),
        "player": [model.labels[i] for i in model.label_of_node],
        "policy": model.policy_names,
        "degree": degree,
        "self_loop": self_loop,
        "score": model.scores,
        "decisions": model.decisions,
        "cooperation_rate": np.divide(model.cooperations, model.decisions,
                                      out=np.full(model.n_nodes, np.nan),
                                      where=model.decisions > 0),
    })
    agents.to_csv(folder / "agents.csv", index=False)
    summary = {
        "scenario": scenario.name,
        "description": scenario.description,
        "seed": model.master_seed,
        "abm_version": __version__,
        "agents": model.n_nodes,
        "edges": int(len(model.edges)),
        "steps": len(tally.steps),
        "matches": int(steps["matches"].sum()),
        "decisions": int(steps["decisions"].sum()),
        "cooperation_rate": tally.cooperation_rate(),
        "cooperation_by_step": steps["cooperation_rate"].tolist(),
        # by label (player name), like the ranking and the evolution block
        "final_shares": {label: float(v) for label, v in zip(model.labels, model.shares())},
        "ranking": tally.ranking(),
        "wall_seconds": round(wall_seconds, 3),
    }
    if model.evolution is not None:
        summary["evolution"] = _evolution_summary(model, steps)
        if model.snapshots:
            _write_snapshots(model, folder)
    unread = None
    if model.llm_policies:
        unread = tally.unread_matrix()
        counts = tally.unread_counts()
        counts.to_csv(folder / "invalid_answers.csv", index=False)
        summary["llm"] = [_llm_summary(model, policy, counts) for policy in model.llm_policies]
        summary["warnings"] = [w for entry in summary["llm"] for w in entry["warnings"]]
        behaviour = _llm_behaviour(model, folder, summary)
    (folder / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n",
                                         encoding="utf-8")
    if with_charts:
        about = [_heatmap_subtitle(model)]
        charts.save(charts.heatmap(payoff, "Mean total payoff of the row player per match",
                                   "payoff", unread=unread, subtitle=about),
                    folder, "payoff_heatmap")
        charts.save(charts.heatmap(
            defections, "Intended defections of the row player per match (mean)", "defections",
            unread=unread, subtitle=["rounds in which the row player chose D, counted before "
                                     "noise flips an action", *about]),
            folder, "defections_heatmap")
        if model.llm_policies and behaviour is not None:
            from abm.behaviour_charts import fingerprint_chart, round_chart
            rounds_table, prints = behaviour
            charts.save(round_chart(rounds_table), folder, "llm_rounds")
            charts.save(fingerprint_chart(prints[prints["opponent"] == "all"]
                                          .set_index("situation")), folder, "llm_fingerprint")
        by_round = _cooperation_by_round(model.last_result) if len(steps) == 1 else None
        charts.save(charts.cooperation_chart(steps, by_round), folder, "cooperation")
        if model.evolution is not None:
            charts.save(charts.shares_chart(steps, model.labels), folder, "shares")
            if model.snapshots:
                step, grid = model.snapshots[-1]
                charts.save(charts.lattice_chart(grid.reshape(model.grid_shape), model.labels,
                                                 step), folder, "lattice")
    return summary

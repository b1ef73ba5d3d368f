"""A core install (no llm extra): everything but the LLM backend imports and runs
without torch or transformers, and an LLM scenario says what to install.

The subprocesses block torch and transformers (``sys.modules[name] = None`` makes
``import name`` fail as if it were not installed), so these tests check the same
thing with or without the llm extra.
"""

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from conftest import ROOT, SCENARIOS
from test_round_robin import PAYOFF, PLAYERS

import abm.policies.llm_backends as llm_backends
from abm.run import main

BLOCK = "import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n"


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which torch and transformers cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.slow
def test_every_module_but_the_backend_imports_without_torch():
    proc = run_blocked("""
        import importlib, json, pkgutil
        import abm
        names = sorted(m.name for m in pkgutil.walk_packages(abm.__path__, "abm."))
        # __main__ modules run their command on import; the backend, its loading,
        # placement and decode steps and the training code are the torch users (loaded
        # only when a model is)
        torch_users = {
            "abm.llm.backend",
            "abm.llm.loading",
            "abm.llm.placement",
            "abm.llm.static_decode",
            "abm.finetune.losses",
            "abm.finetune.train",
        }
        skipped = torch_users | {n for n in names if n.endswith(".__main__")}
        for name in names:
            if name not in skipped:
                importlib.import_module(name)
        print(json.dumps([n for n in names if n not in skipped]))
        """)
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout)
    # the modules a core install is documented to use are among them
    assert {
        "abm.run",
        "abm.model",
        "abm.policies",
        "abm.policies.llm",
        "abm.policies.llm_params",
        "abm.policies.llm_backends",
        "abm.batch",
        "abm.viz.model",
        "abm.llm.stats",
        "abm.llm.prompts",
        "abm.export",
        "abm.finetune.data",
        "abm.finetune.agreement",
    } <= set(imported)


@pytest.mark.slow
def test_a_rule_only_scenario_runs_without_torch(tmp_path):
    out = tmp_path / "run"
    proc = run_blocked(
        """
        import runpy
        sys.argv = ["abm.run", *sys.argv[1:]]
        runpy.run_module("abm.run", run_name="__main__")
        """,
        str(SCENARIOS / "round_robin_rules.toml"),
        "--quiet",
        "--out",
        str(out),
        "--set",
        "output.charts=false",
    )
    assert proc.returncode == 0, proc.stderr
    payoff = pd.read_csv(out / "payoff_matrix.csv", index_col="player")
    assert list(payoff.index) == PLAYERS
    assert payoff.to_numpy().tolist() == PAYOFF
    assert "llm" not in json.loads((out / "summary.json").read_text())


def test_an_llm_scenario_without_torch_names_the_llm_extra(
    scenario_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch", None)  # already so on a core install
    monkeypatch.setattr(llm_backends, "_BACKENDS", {})
    # a model folder that exists, so that the model itself is not what is missing
    (tmp_path / "model").mkdir()
    path = scenario_file(
        '[match]\nrounds = 2\n[graph]\nkind = "complete"\n[population]\n'
        'players = ["all_d", { name = "llm", model = "model" }]\n'
    )
    out = tmp_path / "o"
    assert main([str(path), "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "LLM players need torch, which is not installed" in err
    assert 'pip install torch==2.13.0 && pip install -e ".[llm]"' in err
    assert "Traceback" not in err
    assert not out.exists()


def test_backend_stats_are_torch_free_counters_starting_at_zero():
    from abm.llm.stats import BackendStats

    stats = BackendStats()
    assert (
        stats.forward_passes,
        stats.generate_calls,
        stats.tokens,
        stats.seconds,
        stats.prefix_hits,
    ) == (0, 0, 0, 0.0, 0)
    assert stats.extra == {} and stats.extra is not BackendStats().extra


@pytest.mark.llm_extra
def test_the_backend_module_still_offers_backend_stats():
    from abm.llm.backend import BackendStats as from_backend
    from abm.llm.stats import BackendStats

    assert from_backend is BackendStats

"""Scenario hardening: names, sizes, strict types, Axelrod parameters, memory windows of
mutants, paths relative to the scenario, field paths in errors, LLM records per step,
and ``--set`` with list indices."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

from abm.errors import ScenarioError
from abm.model import DilemmaModel
from abm.run import main
from abm.scenario import load_scenario, validate_scenario

GOOD = """\
seed = 1
[game]
noise = 0.0
[match]
rounds = 3
[graph]
kind = "complete"
self_loops = true
[population]
players = ["all_d", "tit_for_tat", "random"]
[output]
charts = false
"""

EVOLVING = """\
seed = 1
[match]
rounds = 3
[memory]
window = 1
[graph]
kind = "ring"
n = 6
[population]
players = ["all_d", "tit_for_tat", "all_c", "all_d", "tit_for_tat", "all_c"]
[evolution]
rule = "imitate_best"
mutation = 0.1
mutants = ["all_d", "tit_for_two_tats"]
"""


def edit(old, new, base=GOOD):
    assert old in base
    return base.replace(old, new)


# (scenario text, extra command-line arguments, fragments the one-line error must hold);
# "{tmp}" stands for the test's folder
BAD = {
    # 1. a name is a file name: no climbing out of outputs/, no nesting, no hidden folder
    "name-parent": (
        'name = "../escaped"\n' + GOOD,
        [],
        ["field 'name'", "'../escaped'", "letters, digits"],
    ),
    "name-absolute": ('name = "{tmp}/abs"\n' + GOOD, [], ["field 'name'", "file name"]),
    "name-nested": ('name = "a/b"\n' + GOOD, [], ["field 'name'", "'a/b'"]),
    "name-hidden": ('name = ".hidden"\n' + GOOD, [], ["field 'name'", "not starting with '.'"]),
    "name-nul": ('name = "a\\u0000b"\n' + GOOD, [], ["field 'name'", "\\x00"]),
    "name-long": (
        f'name = "{"n" * 300}"\n' + GOOD,
        [],
        ["field 'name'", "300 characters", "at most 100"],
    ),
    "name-set": (GOOD, ["--set", "name=../../x"], ["field 'name' (set with --set)", "'../../x'"]),
    # 5. sizes that cannot fit are refused before anything is built
    "huge-ring": (
        edit('kind = "complete"', 'kind = "ring"\nn = 1_000_000_000').replace(
            'players = ["all_d", "tit_for_tat", "random"]',
            'mix = [{ policy = "all_d", share = 1.0 }]',
        ),
        [],
        ["field 'graph.n'", "GiB of memory", "1,000,000,000 nodes", "ABM_MEMORY_LIMIT_GB"],
    ),
    "huge-grid": (
        edit('kind = "complete"', 'kind = "grid"\nrows = 100_000\ncols = 100_000').replace(
            'players = ["all_d", "tit_for_tat", "random"]',
            'mix = [{ policy = "all_d", share = 1.0 }]',
        ),
        [],
        ["field 'graph.rows'", "10,000,000,000 nodes"],
    ),
    "endless-matches": (
        edit("rounds = 3", "continuation_probability = 0.9999999"),
        [],
        ["field 'match.continuation_probability'", "GiB of memory", "quantile"],
    ),
    # 6. Axelrod parameters are checked when the scenario loads
    "axelrod-p": (
        edit('"random"]', '{ name = "axelrod", strategy = "Random", p = 7 }]'),
        [],
        ["field 'population.players[2]'", "'p' is a probability", "got 7"],
    ),
    "axelrod-vector": (
        edit(
            '"random"]',
            '{ name = "axelrod", strategy = "MemoryOnePlayer", four_vector = [1, 0, 0, 2] }]',
        ),
        [],
        ["field 'population.players[2]'", "four_vector", "[1, 0, 0, 2]"],
    ),
    "axelrod-constructor": (
        edit('"random"]', '{ name = "axelrod", strategy = "ZDExtort2", phi = 5 }]'),
        [],
        ["field 'population.players[2]'", "does not take these parameters", "phi = 5"],
    ),
    # 13. strict types, finite numbers
    "rounds-bool": (
        edit("rounds = 3", "rounds = true"),
        [],
        ["field 'match.rounds'", "valid integer", "got true"],
    ),
    "self-loops-string": (
        edit("self_loops = true", 'self_loops = "yes"'),
        [],
        ["field 'graph.self_loops'", "valid boolean", "'yes'"],
    ),
    "seed-bool": (edit("seed = 1", "seed = true"), [], ["field 'seed'", "valid integer"]),
    "payoff-nan": (
        edit("noise = 0.0", 'kind = "custom"\nR = nan'),
        [],
        ["field 'game.R'", "finite number", "nan"],
    ),
    "payoff-inf": (
        edit("noise = 0.0", 'kind = "custom"\nT = inf'),
        [],
        ["field 'game.T'", "finite number", "inf"],
    ),
    "noise-nan": (edit("noise = 0.0", "noise = nan"), [], ["field 'game.noise'"]),
    "policy-param-bool": (
        edit('"random"]', '{ name = "random", p = true }]'),
        [],
        ["field 'population.players[2]'", "p: Input should be a valid number"],
    ),
    "label-number": (
        edit('"random"]', '{ name = "random", label = 5 }]'),
        [],
        ["field 'population.players[2].label'", "valid string"],
    ),
    # 19. every policy that can play must fit the memory window
    "mutant-window": (
        EVOLVING,
        [],
        ["field 'memory.window'", "'tit_for_two_tats'", "evolution.mutants[1]", "2 rounds"],
    ),
    "mix-window": (
        edit("rounds = 3", "rounds = 3\n[memory]\nwindow = 1")
        .replace("self_loops = true", "n = 3")
        .replace(
            'players = ["all_d", "tit_for_tat", "random"]',
            'mix = [{ policy = "all_d", share = 0.999 }, '
            '{ policy = "tit_for_two_tats", share = 0.001 }]',
        ),
        [],
        ["field 'memory.window'", "population.mix[1].policy"],
    ),
    # 21. an LLM model error names the file once and the whole field path once
    "llm-model": (
        edit('"random"]', '{ name = "llm", model = "./no-such-model" }]'),
        [],
        ["field 'population.players[2].model'", "no such model folder", "{tmp}/no-such-model"],
    ),
    # 26. --set key paths with list indices, and their errors
    "set-index": (
        GOOD,
        ["--set", "population.players[7].p=0.3"],
        [
            "--set 'population.players[7].p=0.3'",
            "field 'population.players[7].p'",
            "has 3 elements, so there is no [7]",
        ],
    ),
    "set-into-value": (
        GOOD,
        ["--set", "game.noise.level=1"],
        ["field 'game.noise.level'", "game.noise is a value, not a table"],
    ),
    "set-bad-key": (GOOD, ["--set", "population.players[x].p=1"], ["is not a key path"]),
    "set-bad-value": (
        GOOD,
        ["--set", "population.players[2].p=2"],
        ["field 'population.players[2]' (set with --set)", "less than or equal"],
    ),
}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("with_out", [False, True], ids=["default-folder", "out"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error_and_leaves_nothing(
    case, with_out, tmp_path, capsys, monkeypatch
):
    text, extra, fragments = BAD[case]
    monkeypatch.setenv("ABM_MEMORY_LIMIT_GB", "4")  # the same limit on any machine
    # the run's working folder lies two levels down, so that "../escaped" or "../../x"
    # would still land inside tmp_path, where the check below sees it
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = tmp_path / "scenario.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    args = [str(path), "--quiet", *extra]
    if with_out:
        args += ["--out", str(tmp_path / "outs" / "run")]
    before = tree(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: "), err
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(tmp_path)) in err, (fragment, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before  # no output folder, no partial folder, nothing outside


# ------------------------------------------------------------------ 1. names


def test_a_file_stem_that_is_no_file_name_still_names_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "my run (v2).toml"
    path.write_text(GOOD, encoding="utf-8")
    assert load_scenario(path).name == "my-run-v2"
    assert main([str(path), "--quiet"]) == 0
    [folder] = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("my-run-v2-")


def test_good_names_are_kept(tmp_path):
    for name in ("run_1", "noise-0.05", "A.b-c_d", "x" * 100):
        data = tomllib.loads(f'name = "{name}"\n' + GOOD)
        assert validate_scenario(data).name == name


# ------------------------------------------------------------------ 5. sizes


def test_big_benchmark_still_fits(monkeypatch):
    from abm.graphs import graph_size
    from abm.model import check_size

    # benchmarks/scale.py: 10^6 agents on Barabasi-Albert m = 2, 5 rounds (3.5 GiB measured)
    scenario = validate_scenario(
        {
            "graph": {"kind": "barabasi_albert", "n": 1_000_000, "m": 2},
            "population": {"mix": [{"policy": "all_d", "share": 1.0}]},
            "match": {"rounds": 5},
            "output": {"rounds": False},
        }
    )
    nodes, edges, field = graph_size(scenario.graph)
    assert (nodes, edges, field) == (1_000_000, 1_999_996, "n")
    # whatever this machine has free now: say 64 GiB, capped at 4 by the variable
    monkeypatch.setattr("abm.model.available_memory", lambda: 64 * 2**30)
    monkeypatch.setenv("ABM_MEMORY_LIMIT_GB", "4")
    check_size(scenario, nodes, edges, "graph.n", "scale.toml")  # no error
    monkeypatch.setenv("ABM_MEMORY_LIMIT_GB", "1")
    with pytest.raises(ScenarioError, match="field 'graph.n'.*ABM_MEMORY_LIMIT_GB=1"):
        check_size(scenario, nodes, edges, "graph.n", "scale.toml")


def test_memory_limit_variable_must_be_a_number(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ABM_MEMORY_LIMIT_GB", "lots")
    path = tmp_path / "s.toml"
    path.write_text(GOOD, encoding="utf-8")
    assert main([str(path), "--quiet", "--out", str(tmp_path / "out")]) == 2
    assert "ABM_MEMORY_LIMIT_GB: must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_geometric_length_quantile():
    from abm.model import longest_match

    scenario = validate_scenario(
        {
            "graph": {"kind": "complete", "n": 2},
            "population": {"mix": [{"policy": "all_d", "share": 1.0}]},
            "match": {"continuation_probability": 0.9},
        }
    )
    # P(L > l) = 0.9^l <= 1e-6 from l = 132
    assert longest_match(scenario.match, 1) == 132
    # with 10^7 matches, the median of the longest is the larger one
    assert longest_match(scenario.match, 10**7) > 132


# ------------------------------------------------------------------ 6. Axelrod


def test_axelrod_list_parameter_plays():
    pytest.importorskip("axelrod")
    # a list parameter once raised "unhashable type: list" when the policies were keyed
    spec = {"name": "axelrod", "strategy": "MemoryOnePlayer", "four_vector": [1, 0, 0, 0]}
    model = DilemmaModel(
        validate_scenario(
            {
                "seed": 1,
                "match": {"rounds": 4},
                "graph": {"kind": "complete"},
                "population": {"players": [spec, "alternator"]},
            }
        )
    )
    model.step()
    # four_vector = (1, 0, 0, 0) cooperates only after mutual C; alternator C D C D
    assert "".join("CD"[a] for a in model.last_result.actual[:, 0]) == "CCDD"


# ------------------------------------------------------------------ 20. paths


def test_paths_are_relative_to_the_scenario_for_mutants_and_models(tmp_path, monkeypatch):
    folder = tmp_path / "scenarios"
    (folder / "models" / "tiny").mkdir(parents=True)
    (folder / "local-model").mkdir()
    monkeypatch.chdir(tmp_path)  # not the scenario's folder
    llm = (
        '{ name = "llm", framing = "custom", template = "prompts/t.txt", '
        'labels = ["A", "B"], chat_template = "%s", model = "%s" }'
    )
    text = EVOLVING.replace("window = 1", "window = 2").replace(
        'mutants = ["all_d", "tit_for_two_tats"]',
        "mutants = ["
        + llm % ("vicuna", "./models/tiny")
        + ", "
        + llm % ("chat/t.jinja", "local-model")
        + ", "
        + llm % ("plain", "lmsys/vicuna-7b-v1.5-16k")
        + ", "
        + llm % ("plain", "~/weights/m.gguf")
        + "]",
    )
    path = folder / "evolve.toml"
    path.write_text(text, encoding="utf-8")
    first, second, hub, home = [m.params for m in load_scenario(path).mutants()]
    assert first["template"] == str(folder / "prompts" / "t.txt")
    assert first["chat_template"] == "vicuna"  # a named format, not a file
    assert first["model"] == str(folder / "models" / "tiny")
    assert second["chat_template"] == str(folder / "chat" / "t.jinja")
    assert second["model"] == str(folder / "local-model")  # a folder next to the scenario
    assert hub["model"] == "lmsys/vicuna-7b-v1.5-16k"  # a Hugging Face id stays as it is
    assert home["model"] == str(Path("~/weights/m.gguf").expanduser())


def test_a_server_s_model_name_is_never_taken_for_a_path(tmp_path, monkeypatch):
    # vllm serve ./llama-70b serves the model under the name "./llama-70b"
    folder = tmp_path / "scenarios"
    (folder / "llama-70b").mkdir(parents=True)  # a folder of that name next to the scenario
    monkeypatch.chdir(tmp_path)
    players = ", ".join(
        f'{{ name = "llm", label = "L{i}", server = "http://127.0.0.1:8000/v1", model = "{m}", mode = "generate" }}'
        for i, m in enumerate(["./llama-70b", "llama-70b", "~/m.gguf"])
    )
    text = GOOD.replace('players = ["all_d", "tit_for_tat", "random"]', f"players = [{players}]")
    path = folder / "server.toml"
    path.write_text(text, encoding="utf-8")
    models = [p.params["model"] for p in load_scenario(path).population.players]
    assert models == ["./llama-70b", "llama-70b", "~/m.gguf"]


def test_set_values_for_players_paths_are_resolved_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s").mkdir()
    path = tmp_path / "s" / "x.toml"
    path.write_text(GOOD, encoding="utf-8")
    scenario = load_scenario(path, ['population.players[2]={ name = "llm", model = "./m.gguf" }'])
    assert scenario.population.players[2].params["model"] == str(tmp_path / "s" / "m.gguf")


# ------------------------------------------------------------------ 24. LLM records


def test_llm_records_are_handed_out_per_step_and_not_kept(fake):
    model = DilemmaModel(
        validate_scenario(
            {
                "seed": 3,
                "match": {"rounds": 2},
                "graph": {"kind": "complete"},
                "population": {"players": [{"name": "llm", "label": "LLM"}, "all_d", "all_c"]},
                "pairing": {"steps": 4},
            }
        )
    )
    policy = model.llm_policies[0]
    assert model.last_exchanges == []
    for step in range(4):
        model.step()
        # two matches of two rounds: four decisions, all of this step
        assert len(model.last_exchanges) == 4
        assert {r["step"] for r in model.last_exchanges} == {step + 1}
        assert len(policy.records) == 4  # the policy holds one step, not the whole run
    # drain() still returns the last step's records, once
    assert policy.drain() == model.last_exchanges
    assert policy.drain() == []


# ------------------------------------------------------------------ 26. --set


def test_set_reaches_into_lists(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(GOOD, encoding="utf-8")
    out = tmp_path / "out"
    code = main(
        [
            str(path),
            "--quiet",
            "--out",
            str(out),
            "--set",
            "population.players[2].p=0.25",
            "--set",
            'population.players[1]="all_c"',
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["population"]["players"] == ["all_d", "all_c", {"name": "random", "p": 0.25}]


def test_sweep_overrides_still_apply(tmp_path):
    from abm.scenario import apply_overrides, parse_override

    # abm.batch.sweep joins the segments and parses them again
    path, value = parse_override("population.players[5].framing=neutral")
    assert path == ["population", "players[5]", "framing"] and value == "neutral"
    data = tomllib.loads(GOOD)
    apply_overrides(data, ["game.noise=0.1", "pairing.steps=2"])
    assert data["game"]["noise"] == 0.1 and data["pairing"] == {"steps": 2}


def test_strict_types_keep_floats_taking_integers():
    scenario = validate_scenario(
        tomllib.loads(edit("noise = 0.0", 'kind = "custom"\nR = 3\nS = 0\nT = 5\nP = 1\nnoise = 0'))
    )
    assert scenario.game.R == 3.0 and isinstance(scenario.game.R, float)
    assert np.isclose(scenario.game.noise, 0.0)


@pytest.mark.parametrize(
    "target, message",
    [
        ("folder", "is a folder; give a graph file"),
        ("/dev/zero", "is not a regular file"),
    ],
)
def test_a_graph_path_that_is_no_file_says_what_it_is(
    scenario_file, tmp_path, capsys, target, message
):
    from abm.run import main

    (tmp_path / "folder").mkdir()
    path = scenario_file(
        f'[graph]\nkind = "file"\npath = "{target}"\n[population]\nplayers = ["all_c", "all_d"]\n'
    )
    assert main([str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "field 'graph.path'" in err and message in err and "no such file" not in err


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "../up"])
def test_sweep_names_follow_the_scenario_name_rule(tmp_path, capsys, name):
    from abm.batch.__main__ import main

    (tmp_path / "base.toml").write_text(GOOD)
    (tmp_path / "sweep.toml").write_text(
        f'name = "{name}"\nscenario = "base.toml"\n[sweep]\ngame.noise = [0.0, 0.1]\n'
    )
    assert main([str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "field 'name'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""A bad sweep file is explained the way a bad scenario is: ``FILE: field 'a.b': ...``,
unknown keys with the closest allowed key and the keys allowed there."""

import re

import pytest
from batch_scenarios import tiny_base

from abm.batch.__main__ import main
from abm.batch.sweep import load_sweep
from abm.errors import ScenarioError
from abm.run import main as run_main

HEAD = 'scenario = "base.toml"\nseed = 11\n'
KEY_PATH_STARTS = (
    "a key path starts with one of: name, description, seed, game, match, "
    "memory, graph, population, pairing, output, evolution"
)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "base.toml").write_text(tiny_base(), encoding="utf-8")
    return tmp_path


def error_of(path, overrides=None) -> str:
    with pytest.raises(ScenarioError) as info:
        load_sweep(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        # unknown keys, with did-you-mean and the keys allowed there
        (
            HEAD + "[sweeep]\n",
            "unknown key 'sweeep' (did you mean 'sweep'?); allowed keys here: "
            "scenario, name, description, seed, set, sweep, report",
        ),
        (
            HEAD + '[report]\nmetric = ["x"]\n',
            "unknown key 'report.metric' (did you mean 'metrics'?); allowed keys here: metrics",
        ),
        (
            HEAD + "[sweep]\ngaem.noise = [0.1]\n",
            "field 'sweep.gaem.noise': unknown key path 'gaem.noise' (did you mean 'game'?); "
            + KEY_PATH_STARTS,
        ),
        (
            HEAD + "[set]\ngaem.noise = 0.1\n",
            "field 'set.gaem.noise': unknown key path 'gaem.noise' (did you mean 'game'?); "
            + KEY_PATH_STARTS,
        ),
        (
            HEAD + '[sweep]\n"game..noise" = [0.1]\n',
            "field 'sweep.game..noise': not a key path; write dotted keys such as game.noise, with "
            '[i] to pick a list element, as in "population.players[5].framing"',
        ),
        # wrong types: pydantic's words, as for a scenario
        (
            HEAD + '[sweep]\nreplicates = "2"\n',
            "field 'sweep.replicates': Input should be a valid integer (got '2')",
        ),
        (
            HEAD + "[sweep]\nreplicates = true\n",
            "field 'sweep.replicates': Input should be a valid integer (got true)",
        ),
        (
            HEAD + "[sweep]\nreplicates = 0\n",
            "field 'sweep.replicates': Input should be greater than or equal to 1 (got 0)",
        ),
        (HEAD + "name = 3\n", "field 'name': Input should be a valid string (got 3)"),
        (
            'scenario = "base.toml"\nseed = -1\n',
            "field 'seed': Input should be greater than or equal to 0 (got -1)",
        ),
        (HEAD + "sweep = 3\n", "field 'sweep': must be a table (got 3)"),
        (
            HEAD + '[report]\nmetrics = ["mean_payoff", 2]\n',
            "field 'report.metrics[1]': Input should be a valid string (got 2)",
        ),
        # what a sweep needs
        (
            "seed = 1\n",
            "field 'scenario' is required: the base scenario file, relative to the "
            'sweep file, e.g. scenario = "round_robin_rules.toml"',
        ),
        (
            HEAD + "[sweep]\ngame.noise = 0.1\n",
            "field 'sweep.game.noise': expected a list of values to sweep, such as [0, 0.01, 0.05] "
            "(a single value goes in [set]) (got 0.1)",
        ),
        (
            HEAD + "[sweep]\ngame.noise = [0.1, 0.1]\n",
            "field 'sweep.game.noise': the value 0.1 is listed twice; each value must appear once "
            "(got [0.1, 0.1])",
        ),
        (
            HEAD + "[sweep]\nseed = [1, 2]\n",
            "field 'sweep.seed': 'seed' cannot be swept or set: each run's seed is derived from the "
            "sweep's seed and the replicate; set the top-level seed and [sweep] replicates instead",
        ),
        (
            HEAD + "[[sweep.zip]]\ngame.noise = [0.0, 0.1]\nmatch.rounds = [2]\n",
            "field 'sweep.zip[0]': zipped lists must have the same length; got game.noise: 2, "
            "match.rounds: 1",
        ),
        (
            HEAD + "[sweep]\nzip = 3\n",
            "field 'sweep.zip': must be tables of lists of the same length ([[sweep.zip]]), each "
            "varied together as one dimension (got 3)",
        ),
        # fields found wrong beside each other are worded the same way
        (
            HEAD + "[sweep]\ngame.noise = [0.1]\n[[sweep.zip]]\ngame.noise = [0.2]\n",
            "field 'sweep.zip[0].game.noise': swept twice (also at 'sweep.game.noise'); sweep each "
            "key once",
        ),
        (
            HEAD + '[sweep]\n"game.noise" = [0.1]\ngame.noise = [0.2]\n',
            "field 'sweep': key 'game.noise' is written twice; give each key once",
        ),
        (
            HEAD + "[set]\ngame.noise = 0.1\n[sweep]\ngame.noise = [0.2]\n",
            "field 'set.game.noise': also swept (at 'sweep.game.noise'); keep one",
        ),
        ('scenario = "nope.toml"\n', "field 'scenario': no such scenario file: {folder}/nope.toml"),
    ],
)
def test_sweep_errors_read_like_scenario_errors(folder, text, message):
    path = folder / "sweep.toml"
    path.write_text(text, encoding="utf-8")
    assert error_of(path) == f"{path}: " + message.format(folder=folder)


def test_the_same_mistake_reads_alike_in_a_scenario_and_a_sweep(folder, capsys):
    scenario = folder / "scenario.toml"
    scenario.write_text(tiny_base().replace("[match]", "[match]\nround = 2"), encoding="utf-8")
    sweep = folder / "sweep.toml"
    sweep.write_text(HEAD + '[report]\nmetric = ["x"]\n', encoding="utf-8")
    assert run_main([str(scenario), "--quiet"]) == 2
    from_scenario = capsys.readouterr().err
    assert main([str(sweep), "--dry-run"]) == 2
    from_sweep = capsys.readouterr().err
    pattern = (
        r"^error: (\S+): unknown key '(\w+)\.(\w+)' \(did you mean '(\w+)'\?\); "
        r"allowed keys here: [\w, ]+\n$"
    )
    assert re.match(pattern, from_scenario).groups() == (str(scenario), "match", "round", "rounds")
    assert re.match(pattern, from_sweep).groups() == (str(sweep), "report", "metric", "metrics")


def test_command_line_sets_name_the_sweep_file(folder):
    path = folder / "sweep.toml"
    path.write_text(HEAD + "[sweep]\ngame.noise = [0.1]\n", encoding="utf-8")
    assert error_of(path, ["gaem.noise=1"]) == (
        f"{path}: --set 'gaem.noise=1': unknown key path 'gaem.noise' (did you mean 'game'?); "
        + KEY_PATH_STARTS
    )
    assert error_of(path, ["game.noise=0.3"]) == (
        f"{path}: --set 'game.noise=0.3': 'game.noise' is also swept (at 'sweep.game.noise'); "
        "keep one"
    )
    assert error_of(path, ["game.noise"]).startswith(
        f"{path}: --set 'game.noise': expected KEY.PATH=VALUE"
    )


def test_the_base_scenarios_seed_is_checked_as_the_sweeps_would_be(folder):
    (folder / "b.toml").write_text(tiny_base().replace("seed = 5", "seed = -1"))
    path = folder / "sweep.toml"
    path.write_text('scenario = "b.toml"\n[sweep]\ngame.noise = [0.1]\n', encoding="utf-8")
    assert error_of(path) == (
        f"{path}: base scenario b.toml: field 'seed': Input should be "
        "greater than or equal to 0 (got -1)"
    )
    (folder / "b.toml").write_text(tiny_base().replace("seed = 5\n", ""))
    assert error_of(path) == (
        f"{path}: field 'seed' is required: the master seed every run's "
        "seed is derived from, when the base scenario has no seed; e.g. "
        "seed = 1"
    )


def test_an_unreadable_base_scenario_is_named_under_the_scenario_field(folder):
    (folder / "b.toml").write_text("[game\n")
    path = folder / "sweep.toml"
    path.write_text('scenario = "b.toml"\n[sweep]\ngame.noise = [0.1]\n', encoding="utf-8")
    assert error_of(path) == (
        f"{path}: field 'scenario': cannot read the base scenario: "
        f"{folder / 'b.toml'}: not valid TOML: Expected ']' at the end "
        "of a table declaration (at line 1, column 6)"
    )


def test_a_sweep_file_that_is_no_toml_is_named(folder):
    path = folder / "sweep.toml"
    path.write_text(HEAD + "[sweep\n", encoding="utf-8")
    assert error_of(path) == (
        f"{path}: not valid TOML: Expected ']' at the end of a table "
        "declaration (at line 3, column 7)"
    )
    assert error_of(folder / "nope.toml") == f"{folder / 'nope.toml'}: no such sweep file"


def test_valid_spellings_expand_as_before(folder):
    """One [sweep.zip] table is one group, and nested tables are dotted keys."""
    path = folder / "sweep.toml"
    path.write_text(
        HEAD + "[sweep.game]\nnoise = [0.0, 0.1]\n[sweep.zip]\n"
        '"population.players[2].p" = [0.2, 0.4]\nmatch.rounds = [2, 4]\n',
        encoding="utf-8",
    )
    sweep = load_sweep(path)
    assert sweep.keys == ["game.noise", "population.players[2].p", "match.rounds"]
    assert [axis.keys for axis in sweep.axes] == [
        ("game.noise",),
        ("population.players[2].p", "match.rounds"),
    ]
    assert [axis.values for axis in sweep.axes] == [((0.0,), (0.1,)), ((0.2, 2), (0.4, 4))]
    assert len(sweep.runs) == 4 and sweep.name == "sweep" and sweep.replicates == 1
    assert sweep.metrics == ["cooperation_rate", "mean_payoff"]

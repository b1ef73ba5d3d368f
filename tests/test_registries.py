"""The three registries (graph kinds, LLM framings, evolution update rules): every entry
runs from the command line and shows on the page, rule parameters belong to their rule,
custom framings set every text, and the built-in framings' prompts are as written."""

import dataclasses
import json
from typing import Literal

import networkx as nx
import numpy as np
import pytest

from abm.evolution import UPDATE_RULES
from abm.graphs import GRAPH_KINDS, GraphKind, build_graph, graph_size
from abm.llm.prompts import FRAMINGS, Framing, FramingParts
from abm.model import DilemmaModel
from abm.run import main
from abm.scenario import RULE_PARAMS, EvolutionConfig, load_scenario, validate_scenario
from abm.viz.components import model_params
from abm.viz.model import VizModel, graph_families, graph_table

# Mesa's ComponentsView warns about its early return when the page brings its own components
pytestmark = pytest.mark.filterwarnings("ignore:.*ComponentsView")

# a small table of every graph kind; a kind added to GRAPH_KINDS needs one here
GRAPH_EXAMPLES = {
    "complete": {"kind": "complete", "n": 6},
    "ring": {"kind": "ring", "n": 8, "k": 2},
    "grid": {"kind": "grid", "rows": 3, "cols": 4, "torus": True},
    "watts_strogatz": {"kind": "watts_strogatz", "n": 12, "k": 4, "p": 0.2},
    "barabasi_albert": {"kind": "barabasi_albert", "n": 12, "m": 2},
    "erdos_renyi": {"kind": "erdos_renyi", "n": 12, "p": 0.3},
    "random_regular": {"kind": "random_regular", "n": 12, "d": 3},
    "file": {"kind": "file", "path": "edges.txt"},
}
EDGES = "a b\nb c\nc d\nd a\na c\n"  # 4 nodes, 5 links


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def scenario_text(graph: dict, evolution: dict | None = None, players: str | None = None) -> str:
    table = "".join(f"{k} = {toml_value(v)}\n" for k, v in graph.items())
    text = f"seed = 4\n[match]\nrounds = 2\n[graph]\n{table}[population]\n"
    text += players or (
        'mix = [{ policy = "all_c", share = 0.5 }, { policy = "all_d", share = 0.5 }]\n'
    )
    text += "[pairing]\nsteps = 2\n"
    if evolution:
        text += "[evolution]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in evolution.items())
    return text


def run_cli(path, tmp_path) -> tuple[int, str]:
    out = tmp_path / "out"
    code = main([str(path), "--quiet", "--out", str(out), "--set", "output.charts=false"])
    return code, out


# ------------------------------------------------------------------ graph kinds


def test_every_graph_kind_has_an_example():
    assert set(GRAPH_EXAMPLES) == set(GRAPH_KINDS)


@pytest.mark.parametrize("kind", list(GRAPH_KINDS))
def test_every_graph_kind_runs_from_the_command_line(kind, scenario_file, tmp_path):
    (tmp_path / "edges.txt").write_text(EDGES)
    path = scenario_file(scenario_text(GRAPH_EXAMPLES[kind]))
    code, out = run_cli(path, tmp_path)
    assert code == 0
    assert load_scenario(out / "config.toml").graph.kind == kind  # the resolved file reads back


@pytest.mark.parametrize("kind", list(GRAPH_KINDS))
def test_every_graph_kind_knows_its_size_before_it_is_built(kind, tmp_path):
    table = dict(GRAPH_EXAMPLES[kind])
    if kind == "file":
        (tmp_path / "edges.txt").write_text(EDGES)
        table["path"] = str(tmp_path / "edges.txt")
    config = validate_scenario({"graph": table, "population": {"players": ["all_c"]}}).graph
    assert isinstance(config, GRAPH_KINDS[kind])
    graph = build_graph(config, np.random.default_rng(0))
    size = graph_size(config)
    if kind == "file":  # only reading the file tells
        assert size is None and graph.number_of_nodes() == 4 and graph.number_of_edges() == 5
        return
    nodes, links, _ = size
    assert nodes == graph.number_of_nodes()
    assert links >= graph.number_of_edges()  # exact but for the random kinds' bound


def test_graph_kind_sizes_by_hand():
    def size(table):
        return graph_size(
            validate_scenario({"graph": table, "population": {"players": ["all_c"]}}).graph
        )

    # 3 x 4 torus, von Neumann: 12 nodes, 2 links each; 5 copies, each with 12 self-loops;
    # the longer side names the size
    assert size(
        {"kind": "grid", "rows": 3, "cols": 4, "torus": True, "copies": 5, "self_loops": True}
    ) == (60, 5 * (24 + 12), "cols")
    # ring of 8 with 2 on each side: 16 links; 10 copies of 8 nodes: the copies are big
    assert size({"kind": "ring", "n": 8, "k": 2, "copies": 10}) == (80, 160, "copies")
    # Barabasi-Albert: (n - m) new nodes bring m links each
    assert size({"kind": "barabasi_albert", "n": 12, "m": 2}) == (12, 20, "n")


def test_graph_tables_follow_the_rules_of_every_scenario_table():
    from abm.scenario import _Strict

    assert GraphKind.model_config == _Strict.model_config


def test_every_graph_kind_says_what_it_is_and_each_field_what_it_does():
    for name, kind in GRAPH_KINDS.items():
        assert kind.kind_name() == name
        assert kind.__doc__ and kind.__doc__ != GraphKind.__doc__
        for field, info in kind.model_fields.items():
            assert info.description, f"{name}.{field}"


@pytest.mark.parametrize("kind", graph_families())
def test_every_page_graph_family_builds_on_the_page(kind):
    from conftest import SCENARIOS

    model = VizModel(scenario=str(SCENARIOS / "small_world_rules.toml"), graph_kind=kind, n=20)
    assert model.viz_error is None
    assert model.scenario.graph.kind == kind
    assert model.n_nodes == model.scenario.graph.nodes()
    assert kind in model_params(model)["graph_kind"]["values"]


def test_the_page_offers_every_kind_but_a_file_which_only_its_own_scenario_shows(
    scenario_file, tmp_path
):
    assert graph_families() == [k for k in GRAPH_KINDS if k != "file"]
    (tmp_path / "edges.txt").write_text(EDGES)
    model = VizModel(scenario=str(scenario_file(scenario_text(GRAPH_EXAMPLES["file"]))))
    assert model_params(model)["graph_kind"]["values"] == graph_families() + ["file"]


def test_page_defaults_of_a_new_family(scenario_file):
    # from a ring of 8 with self-loops: the grid's defaults, a near-square lattice
    base = {"kind": "ring", "n": 8, "k": 2, "self_loops": True}
    assert graph_table("grid", 10, base) == {
        "kind": "grid",
        "rows": 3,
        "cols": 4,
        "torus": True,
        "self_loops": True,
    }
    assert graph_table("erdos_renyi", 12, base) == {
        "kind": "erdos_renyi",
        "n": 12,
        "p": 0.5,
        "self_loops": True,
    }
    # the same family keeps the scenario's own keys and takes the new size
    assert graph_table("ring", 20, base) == {"kind": "ring", "n": 20, "k": 2, "self_loops": True}


class PathGraph(GraphKind):
    """A path of n agents (a test kind)."""

    kind: Literal["path"]
    """The path."""
    n: int
    """Agents."""

    def build_one(self, seed, fail, n_default):
        return nx.path_graph(self.n)

    def edges(self, n):
        return n - 1


def test_a_new_graph_kind_appears_in_the_page_selector(monkeypatch):
    from conftest import SCENARIOS

    monkeypatch.setitem(GRAPH_KINDS, "path", PathGraph)
    assert graph_families()[-1] == "path"
    model = VizModel(scenario=str(SCENARIOS / "small_world_rules.toml"))
    assert model_params(model)["graph_kind"]["values"][-1] == "path"
    assert graph_table("path", 7, {"kind": "ring", "n": 8}) == {"kind": "path", "n": 7}
    config = PathGraph(kind="path", n=5, copies=2)
    assert config.size() == (10, 8, "n")
    assert sorted(build_graph(config, np.random.default_rng(0)).edges) == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (5, 6),
        (6, 7),
        (7, 8),
        (8, 9),
    ]


# ------------------------------------------------------------------ update rules


@pytest.mark.parametrize("rule", list(UPDATE_RULES))
def test_every_update_rule_runs_from_the_command_line(rule, scenario_file, tmp_path):
    params = dict(UPDATE_RULES[rule].params)  # its own parameters, set to their defaults
    path = scenario_file(scenario_text(GRAPH_EXAMPLES["ring"], {"rule": rule, **params}))
    code, out = run_cli(path, tmp_path)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evolution"]["rule"] == rule
    assert load_scenario(out / "config.toml").evolution.rule == rule
    assert sum(summary["evolution"]["final_shares"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("rule", list(UPDATE_RULES))
def test_every_update_rule_plays_on_the_page(rule, scenario_file):
    model = VizModel(
        scenario=str(scenario_file(scenario_text(GRAPH_EXAMPLES["ring"], {"rule": rule})))
    )
    model.step()
    assert model.evolution.rule is UPDATE_RULES[rule]
    assert model.viz_error is None and model.played_steps == 1


def test_every_update_rule_cites_its_source():
    for name, rule in UPDATE_RULES.items():
        doc = type(rule).__doc__
        assert doc and any(year in doc for year in ("1992", "1998", "2004", "2005", "2006")), name


def test_a_rule_takes_its_own_parameters_with_their_defaults():
    assert EvolutionConfig(rule="fermi").temperature == 0.1
    assert EvolutionConfig(rule="fermi", temperature=2.0).temperature == 2.0
    assert EvolutionConfig(rule="death_birth").intensity == 1.0
    assert EvolutionConfig(rule="moran", intensity=0.1).intensity == 0.1
    # another rule's parameter stays unset, so a resolved scenario reads back as it was
    config = EvolutionConfig(rule="imitate_best")
    assert config.temperature is None and config.intensity is None
    scenario = validate_scenario(
        {
            "graph": {"kind": "ring", "n": 5},
            "population": {"players": ["all_c"]},
            "evolution": {"rule": "fermi"},
        }
    )
    again = validate_scenario(scenario.to_toml_dict())
    assert again.evolution == scenario.evolution


OTHERS_PARAMS = [
    (rule, param)
    for rule in UPDATE_RULES
    for param in RULE_PARAMS
    if param not in UPDATE_RULES[rule].params
]


def test_rule_parameters_are_the_fermi_temperature_and_the_selection_intensity():
    assert set(RULE_PARAMS) == {"temperature", "intensity"}
    assert ("imitate_best", "temperature") in OTHERS_PARAMS
    assert ("fermi", "intensity") in OTHERS_PARAMS and ("moran", "temperature") in OTHERS_PARAMS


@pytest.mark.parametrize("rule, param", OTHERS_PARAMS)
def test_a_parameter_of_another_rule_is_refused(rule, param, scenario_file, tmp_path, capsys):
    path = scenario_file(scenario_text(GRAPH_EXAMPLES["ring"], {"rule": rule, param: 0.5}))
    code, _ = run_cli(path, tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    own = ", ".join(UPDATE_RULES[rule].params) or "no parameter of its own"
    owners = " or ".join(
        f'rule = "{name}"' for name, r in UPDATE_RULES.items() if param in r.params
    )
    assert (
        f"{path}: field 'evolution.{param}': {param} is a parameter of {owners} only; "
        f'rule = "{rule}" takes {own} (got 0.5)'
    ) in err


# ------------------------------------------------------------------ framings

TEMPLATE = """Two traders each pick {first} or {second}. {length_rule} Both {label_c}: {R}.
---
Trade {round}{of_rounds}. {history} Say {first} or {second}."""


def llm_player(framing: str, tmp_path) -> dict:
    if framing == "custom":
        (tmp_path / "trade.txt").write_text(TEMPLATE)
        return {
            "name": "llm",
            "framing": "custom",
            "template": str(tmp_path / "trade.txt"),
            "labels": ["SHARE", "KEEP"],
        }
    return {"name": "llm", "framing": framing}


def llm_scenario_text(player: dict) -> str:
    table = ", ".join(f"{k} = {toml_value(v)}" for k, v in player.items())
    return scenario_text({"kind": "complete"}, players=f'players = [{{ {table} }}, "all_d"]\n')


def test_every_framing_is_a_keyword_built_framing():
    assert set(FRAMINGS) == {"police", "neutral", "custom"}
    assert all(f.kw_only for f in dataclasses.fields(Framing))


@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_every_framing_runs_from_the_command_line(framing, fake, scenario_file, tmp_path):
    path = scenario_file(llm_scenario_text(llm_player(framing, tmp_path)))
    code, out = run_cli(path, tmp_path)
    assert code == 0
    records = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert records and {r["framing"] for r in records} == {framing}


@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_every_framing_plays_on_the_page(framing, fake, scenario_file, tmp_path):
    model = VizModel(scenario=str(scenario_file(llm_scenario_text(llm_player(framing, tmp_path)))))
    model.step()
    assert model.viz_error is None
    assert {r["framing"] for r in model.llm_log} == {framing}


def test_a_custom_framing_sets_every_part(fake, tmp_path):
    # every text of a Framing is set by the template, the labels, the answer prefix, the
    # phrasings or one of the parts
    elsewhere = {
        "name",
        "words",
        "rules",
        "turn",
        "label_c",
        "label_d",
        "answer_prefix",
        "phrasings",
    }
    texts = {f.name for f in dataclasses.fields(Framing)} - elsewhere
    assert texts == set(FramingParts.model_fields)
    player = {
        **llm_player("custom", tmp_path),
        "label": "LLM",
        "reflection": True,
        "parts": {
            "you": "Ann",
            "other": "Bob",
            "round_word": "deal",
            "reflect": "Bob {theirs}; Ann {mine}. Please reflect on your decision-making.",
            "did": ["shared", "kept"],
            "speaker": "Host: ",
        },
    }
    model = DilemmaModel(
        validate_scenario(
            {
                "seed": 1,
                "match": {"rounds": 2},
                "graph": {"kind": "complete"},
                "population": {"players": [player, "all_d"]},
                "pairing": {"steps": 1},
            }
        )
    )
    while model.running:
        model.step()
    policy = model.llm_policies[0]
    first, second = policy.drain()
    assert "There will be 2 deals." in first["prompt"][-1]["content"]
    assert (
        "What you remember of the last 1 deal (oldest first):\n"
        "- Ann: SHARE; Bob: KEEP (Ann got 0 points)"
    ) in second["prompt"][-1]["content"]
    assert first["reflection_prompt"] == (
        "Bob kept; Ann shared. Please reflect on your decision-making."
    )
    assert policy.framing.reminder("generate", "SHARE", "KEEP").startswith(
        "Host: Your reply could not be read."
    )


@pytest.mark.parametrize(
    "parts, message",
    [
        (
            {"yuo": "Ann"},
            "unknown framing part 'yuo'; the parts a custom framing sets are you, "
            "other, round_word, reflect, did, speaker",
        ),
        ({"did": ["only one"]}, "parts.did"),
        (
            {"reflect": "{who} chose {theirs}"},
            "the reflection question uses {who}, which is not a "
            "template variable; allowed: you, other, mine, theirs",
        ),
    ],
)
def test_custom_framing_parts_errors(parts, message, fake, scenario_file, tmp_path, capsys):
    path = scenario_file(llm_scenario_text({**llm_player("custom", tmp_path), "parts": parts}))
    code, _ = run_cli(path, tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert f"{path}: field 'population.players[0]'" in err and message in err


def test_parts_belong_to_a_custom_framing(fake, scenario_file, tmp_path, capsys):
    path = scenario_file(
        llm_scenario_text({"name": "llm", "framing": "neutral", "parts": {"you": "Ann"}})
    )
    code, _ = run_cli(path, tmp_path)
    assert code == 2
    assert 'parts set the texts of framing = "custom"' in capsys.readouterr().err


def played(llm: dict):
    model = DilemmaModel(
        validate_scenario(
            {
                "seed": 1,
                "match": {"rounds": 3},
                "graph": {"kind": "complete"},
                "population": {
                    "players": [{"name": "llm", "label": "LLM", "reflection": True, **llm}, "all_d"]
                },
                "pairing": {"steps": 1},
            }
        )
    )
    while model.running:
        model.step()
    return model.llm_policies[0].drain()


def test_the_police_prompt_is_as_written(fake):
    # police.txt filled in by hand: round 2 of 3 after (remain silent, testify)
    record = played({})[1]
    assert record["prompt"] == [
        {
            "role": "user",
            "content": (
                "You are Suspect1. You and Suspect2 have been arrested and are questioned by the "
                "Police in separate rooms. There will be 3 interrogations. In each interrogation you "
                "either remain silent or testify, and Suspect2 faces the same choice without knowing "
                "yours. To testify means to testify against Suspect2; to remain silent means to say "
                "nothing.\n"
                "Your points in one interrogation:\n"
                "- you both remain silent: you get 9, Suspect2 gets 9\n"
                "- you remain silent and Suspect2 testifies: you get 0, Suspect2 gets 10\n"
                "- you testify and Suspect2 remains silent: you get 10, Suspect2 gets 0\n"
                "- you both testify: you get 5, Suspect2 gets 5\n"
                "Your goal is to get as many points as possible.\n"
                "\n"
                "This is interrogation 2 of 3.\n"
                "What you remember of the last 1 interrogation (oldest first):\n"
                "- Suspect1: remain silent; Suspect2: testify (Suspect1 got 0 points)\n"
                "Your points in the interrogations you remember: 0.\n"
                "Your reflection after the last interrogation: I think it went as planned.\n"
                "Police: Will you remain silent or testify? "
                'Answer with "remain silent" or "testify".'
            ),
        }
    ]
    assert record["reflection_prompt"] == (
        "Police: In this simulation, Suspect2 testified against the other, while Suspect1 "
        "testified against the other. Based on this outcome, please reflect on your "
        "decision-making in this simulation."
    )


def test_the_neutral_prompt_is_as_written(fake):
    # neutral.txt filled in by hand: round 2 of 3 after (J, F)
    record = played({"framing": "neutral", "mode": "generate"})[1]
    assert record["prompt"][-1]["content"] == (
        "You are playing a game with another player. There will be 3 rounds. In each round "
        "you both choose one of two options, J or F, at the same time and without seeing the "
        "other's choice.\n"
        "Your points in one round:\n"
        "- you both choose J: you get 9, the other player gets 9\n"
        "- you choose J and the other chooses F: you get 0, the other gets 10\n"
        "- you choose F and the other chooses J: you get 10, the other gets 0\n"
        "- you both choose F: you get 5, the other player gets 5\n"
        "Your goal is to get as many points as possible.\n"
        "\n"
        "This is round 2 of 3.\n"
        "What you remember of the last 1 round (oldest first):\n"
        "- you: J; the other player: F (you got 0 points)\n"
        "Your points in the rounds you remember: 0.\n"
        "Your reflection after the last round: I think it went as planned.\n"
        'Which option do you choose, J or F? Reply with one line: "Answer: J" or '
        '"Answer: F".'
    )
    assert record["reflection_prompt"] == (
        "In this round, the other player chose F, while you chose F. Based on this outcome, "
        "please reflect on your decision-making in this game."
    )

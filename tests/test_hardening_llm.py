"""Bad LLM settings fail up front with one clear message; runs do not leak into each other."""

from __future__ import annotations

import json
import sys
import time

import pytest
from test_llm_policy import CUSTOM, custom_scenario, scenario

import abm.policies.llm as llm_module
import abm.policies.llm_backends as llm_backends
from abm.model import DilemmaModel
from abm.run import main, run_scenario


def llm_file(scenario_file, **llm) -> str:
    keys = "".join(f", {k} = {json.dumps(v)}" for k, v in llm.items())
    return str(
        scenario_file(
            '[match]\nrounds = 2\n[graph]\nkind = "complete"\n[population]\n'
            f'players = ["all_d", {{ name = "llm"{keys} }}]\n'
        )
    )


@pytest.mark.parametrize(
    "field, message",
    [
        ("{R.foo}", "uses attribute or index access"),
        ("{round.real}", "uses attribute or index access"),
        ("{R.__class__.__mro__}", "uses attribute or index access"),
        ("{history[0]}", "uses attribute or index access"),
        ("{R:>99999999999}", "conversion or format spec"),
        ("{score!r}", "conversion or format spec"),
        ("{points}", "which is not a template variable"),
    ],
)
def test_template_fields_are_plain_names(fake, scenario_file, tmp_path, capsys, field, message):
    started = time.perf_counter()
    path = custom_scenario(scenario_file, tmp_path, CUSTOM.replace("{score}", field))
    assert main([str(path), "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 10  # checked, not filled with a huge width


def test_trust_remote_code_needs_the_environment_too(
    fake, scenario_file, tmp_path, capsys, monkeypatch
):
    path = llm_file(scenario_file, trust_remote_code=True)
    monkeypatch.delenv("ABM_TRUST_REMOTE_CODE", raising=False)
    assert main([path, "--quiet", "--out", str(tmp_path / "a")]) == 2
    assert "ABM_TRUST_REMOTE_CODE=1" in capsys.readouterr().err
    monkeypatch.setenv("ABM_TRUST_REMOTE_CODE", "1")
    assert main([path, "--quiet", "--out", str(tmp_path / "b")]) == 0


def test_a_bad_device_fails_before_any_model_loads(scenario_file, tmp_path, capsys, monkeypatch):
    def never(params):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(llm_module, "shared_backend", never)
    assert main([llm_file(scenario_file, device="banana"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "device 'banana'" in err and '"cuda:N"' in err and "Traceback" not in err


def test_missing_llm_extra_gives_the_install_command(scenario_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch", reason="without torch the message names torch instead")
    monkeypatch.setitem(sys.modules, "transformers", None)  # "not installed"
    monkeypatch.setattr(llm_backends, "_BACKENDS", {})
    path = llm_file(scenario_file, model=str(tmp_path))  # a model folder that exists
    assert main([path, "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "need transformers, which is not installed" in err
    assert 'pip install -e ".[llm]"' in err and "Traceback" not in err


def test_progress_counts_reflections_too(fake):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    model = DilemmaModel(scenario({"reflection": True}, others=("all_d",), rounds=3))
    bar = model.llm_policies[0].progress = Bar()
    while model.running:
        model.step()
    assert bar.n == 3 + 3  # three decisions, each followed by a reflection


# ------------------------------------------------------------------ with a real (tiny) model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_llm import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_hardening"))


def tiny_run(folder, tiny_dir, name, others):
    path = folder / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nseed = 5\n[match]\nrounds = 2\n[graph]\nkind = "complete"\n'
        f"[population]\nplayers = [{', '.join(json.dumps(o) for o in others)}, "
        f'{{ name = "llm", model = "{tiny_dir}", device = "cpu", dtype = "float32" }}]\n'
    )
    out = run_scenario(
        path,
        out=folder / f"out-{name}-{len(list(folder.iterdir()))}",
        quiet=True,
        overrides=["output.charts=false"],
    )
    return json.loads((out / "summary.json").read_text())["llm"][0]


@pytest.mark.llm_extra
def test_a_runs_counters_do_not_depend_on_earlier_runs(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_backends, "_BACKENDS", {})  # this process has loaded nothing yet
    keys = ("tokens", "forward_passes", "prefix_cache_hits", "computed", "memo_hits")
    first = tiny_run(tmp_path, tiny_dir, "a", ["all_d", "all_c"])
    tiny_run(tmp_path, tiny_dir, "b", ["tit_for_tat", "alternator", "all_c"])  # other prompts
    again = tiny_run(tmp_path, tiny_dir, "a", ["all_d", "all_c"])
    assert {k: first[k] for k in keys} == {k: again[k] for k in keys}
    assert first["tokens"] > 0


@pytest.mark.llm_extra
def test_an_uncached_hub_model_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    import socket

    import huggingface_hub.constants as hub_constants

    from abm.errors import ScenarioError
    from abm.llm.backend import Backend
    from abm.llm.models import resolve

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    started = time.perf_counter()
    with pytest.raises(ScenarioError, match="hub cannot be reached") as info:
        Backend(resolve("abm-test/not-cached"), device="cpu", dtype="float32")
    assert "huggingface-cli download abm-test/not-cached" in str(info.value)
    assert time.perf_counter() - started < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ScenarioError, match="HF_HUB_OFFLINE is set"):
        Backend(resolve("abm-test/not-cached"), device="cpu", dtype="float32")

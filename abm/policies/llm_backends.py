"""One backend per model and options in a process, shared by every LLM player that asks.

A local model is loaded once (torch and transformers are imported only then); a
server player gets one connection pool per server, model and request options.
"""

from __future__ import annotations

from typing import Any

from abm.policies.llm_params import LLMParams, quantization_problem

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


def release_backends() -> None:
    """Let go of every model this process loaded, and give their GPU memory back."""
    import gc
    import sys

    _BACKENDS.clear()
    gc.collect()
    torch = sys.modules.get("torch")  # imported only if a model was loaded
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""Milliseconds per decode step: transformers' generate vs abm's eager, static and compiled paths.

    python benchmarks/decode_steps.py [--device cpu|cuda] [--model smollm2-135m-instruct]
        [--shape llama-2-7b|llama-2-13b|small] [--tokenizer FOLDER] [--dtype auto]
        [--batch 1 7 16] [--new-tokens 64] [--bandwidth-gbs 3350]

Every way answers the same prompts (the police framing's rules, then rounds of
different lengths) in the same process, greedily, with end tokens ignored so
every answer is exactly ``--new-tokens`` long. A step's time is
(time for N tokens - time for 1 token) / (N - 1), which leaves the prefill out;
decisions/s is the batch over the time of the whole N-token call. Each way runs
once untimed first (the compiled path compiles there; that time is printed),
then ``--repeat`` times, and the fastest counts.

``--shape`` builds a model of that shape with random weights (the built-in
model's tokenizer and vocabulary, bfloat16 on CUDA, float32 on a CPU, or
``--dtype``), for speed only: its answers mean nothing. ``--tokenizer`` takes the
tokenizer from a folder instead of loading the built-in model (on a machine
where only the tokenizer files were copied); ``small`` is a 4-layer shape for
checking the paths' tokens against each other quickly. On CUDA the table also
gives the bandwidth limit of a step, the weights' bytes over the card's memory
bandwidth (``--bandwidth-gbs``, by default 3350 on an H100 and 4800 on an H200),
and each way's ratio to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}
# GB/s of HBM by card name (the vendors' figures)
BANDWIDTH = {"H200": 4800.0, "H100": 3350.0}
WAYS = ("generate", "abm eager", "abm static", "abm compiled")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape")
    parser.add_argument(
        "--tokenizer", help="with --shape: a folder of tokenizer files (no built-in model needed)"
    )
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 7, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per way; the best counts")
    parser.add_argument("--bandwidth-gbs", type=float, help="the GPU's memory bandwidth, GB/s")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: as a run would, see ABM_THREADS)"
    )
    parser.add_argument(
        "--ways", nargs="+", choices=WAYS, default=list(WAYS), help="which ways to time"
    )
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (a step is the difference of two runs)")
    return args


def load(args: argparse.Namespace) -> Any:
    """A Backend on the device; with --shape, its model swapped for random weights."""
    from abm.llm.backend import Backend
    from abm.llm.models import resolve

    if args.tokenizer and not args.shape:
        raise SystemExit("--tokenizer goes with --shape")
    name = "smollm2-135m-instruct" if args.shape else args.model
    source = resolve(placeholder(args.tokenizer) if args.tokenizer else name)
    backend = Backend(source, device=args.device, dtype=args.dtype, decode="eager")
    if args.shape:
        from transformers import AutoModelForCausalLM

        config = llama_config(backend.tokenizer, **SHAPES[args.shape])
        backend.model = None  # free the built-in weights first
        torch.manual_seed(0)
        with torch.device(backend.device):  # built in place, in its dtype: no float32 copy
            model = AutoModelForCausalLM.from_config(config, dtype=backend.dtype)
        backend.model = model.eval()
    backend.set_threads(args.threads)
    return backend


def llama_config(tok: Any, **shape: Any) -> Any:
    """A Llama configuration of ``shape`` over the tokenizer's vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=4096,
        **shape,
    )


def placeholder(tokenizer: str) -> str:
    """A folder with the tokenizer and a one-layer model, so that a Backend loads in seconds."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    folder = Path(tempfile.mkdtemp(prefix="decode_steps_"))
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(llama_config(tok, **tiny)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def prompts(backend: Any, n: int) -> list[list[int]]:
    """n prompts: the police rules every prompt shares, then rounds of growing length."""
    from abm.llm.prompts import police

    rules = police().rules.format(
        R=9,
        S=0,
        T=10,
        P=5,
        length_rule="There will be 5 interrogations.",
        first="remain silent",
        second="testify",
    )
    out = []
    for i in range(n):
        history = " ".join(
            f"In interrogation {r + 1} Suspect2 chose {'testify' if (i + r) % 3 else 'silent'}."
            for r in range(i % 5)
        )
        turn = (
            f"This is interrogation {i % 5 + 1} of 5. {history} Will you remain silent or testify?"
        )
        messages = [{"role": "system", "content": rules}, {"role": "user", "content": turn}]
        out.append(backend.encode(messages))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate(backend: Any, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' own generate on the left-padded batch; every tensor on the model's device."""
    tok, width = backend.tokenizer, max(map(len, batch))
    device = backend.model.get_input_embeddings().weight.device
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=ids,
            attention_mask=mask,
            eos_token_id=None,  # no early end: every row writes new_tokens, as abm's do here
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    rows = out[:, width:].tolist()
    if any(len(r) != new_tokens for r in rows):
        raise RuntimeError(f"generate wrote {len(rows[0])} tokens, not {new_tokens}")
    return rows


def abm_generate(backend: Any, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    rows: list[list[int]] = []
    backend._text = lambda row: rows.append(list(row)) or ""  # the tokens, not the text
    try:
        backend.generate(batch, max_new_tokens=new_tokens, max_batch_size=len(batch))
    finally:
        del backend._text
    return rows


def timed(fn: Any, device: str) -> tuple[Any, float]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def measure(backend: Any, way: str, batch: list[list[int]], args: argparse.Namespace) -> dict:
    if way == "generate":
        run = hf_generate
    else:
        backend.set_decode(way.removeprefix("abm "))
        run = abm_generate
    n = args.new_tokens
    _, first = timed(lambda: run(backend, batch, n), args.device)
    timed(lambda: run(backend, batch, 1), args.device)
    best_n = best_1 = float("inf")
    tokens = None
    for _ in range(args.repeat):
        tokens, seconds = timed(lambda: run(backend, batch, n), args.device)
        best_n = min(best_n, seconds)
        best_1 = min(best_1, timed(lambda: run(backend, batch, 1), args.device)[1])
    return {
        "first_s": first,
        "step_ms": max(best_n - best_1, 0.0) / (n - 1) * 1000,
        "decisions_s": len(batch) / best_n,
        "tokens": tokens,
        "path": backend.decode_path if way != "generate" else "transformers",
    }


def bandwidth_limit_ms(backend: Any, args: argparse.Namespace) -> tuple[float | None, str]:
    """Milliseconds to read every weight once at the card's bandwidth, and where it came from."""
    if not args.device.startswith("cuda"):
        return None, "no bandwidth limit on a CPU"
    name = torch.cuda.get_device_name(backend.model.device)
    gbs = args.bandwidth_gbs or next((v for k, v in BANDWIDTH.items() if k in name), None)
    if gbs is None:
        return None, f"{name}: give --bandwidth-gbs to see the bandwidth limit"
    size = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    return size / (gbs * 1e9) * 1000, f"{name}, {gbs:.0f} GB/s"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    backend = load(args)
    backend._stop_ids = set()  # end tokens ignored: every answer is --new-tokens long
    model = backend.model
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    limit, card = bandwidth_limit_ms(backend, args)
    every = prompts(backend, max(args.batch))
    lengths = [len(p) for p in every]
    print(
        f"{args.shape or args.model} ({'random weights, ' if args.shape else ''}"
        f"{params / 1e6:.0f} M parameters, {size / 2**30:.2f} GiB in "
        f"{str(backend.dtype).removeprefix('torch.')}) on {backend.device} ({card}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"prompts of {min(lengths)}-{max(lengths)} tokens (median "
        f"{statistics.median(lengths):.0f}), {args.new_tokens} new tokens, "
        f"best of {args.repeat}"
    )
    if limit is not None:
        print(f"bandwidth limit: {limit:.2f} ms per step (weights read once per step)")
    head = f"{'batch':>5}  {'way':<13} {'ms/step':>9} {'decisions/s':>12} {'vs generate':>12}"
    head += f" {'x limit':>8}" if limit is not None else ""
    head += f" {'first call s':>13}  path"
    print(head)
    for size_b in args.batch:
        batch = every[:size_b]
        rows = {way: measure(backend, way, batch, args) for way in args.ways}
        base = rows.get("generate")
        for way, r in rows.items():
            line = f"{size_b:>5}  {way:<13} {r['step_ms']:>9.2f} {r['decisions_s']:>12.2f}"
            ratio = base["step_ms"] / r["step_ms"] if base and r["step_ms"] else float("nan")
            line += f" {ratio:>11.2f}x"
            if limit is not None:
                line += f" {r['step_ms'] / limit:>8.2f}"
            line += f" {r['first_s']:>13.1f}  {r['path']}"
            print(line, flush=True)
        if "abm eager" in rows:
            for way in ("abm static", "abm compiled", "generate"):
                if way in rows:
                    same = rows[way]["tokens"] == rows["abm eager"]["tokens"]
                    print(f"{'':>7}{way} tokens {'==' if same else '!='} abm eager tokens")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The GPU checks of the LLM path in one command: tokens, speed, and running out of memory.

    python benchmarks/gpu_checks.py --tokenizer FOLDER [--parts 1 2 3] [--quick]

On a GPU machine where no weights can be downloaded, only the built-in model's
tokenizer files are needed (copy tokenizer.json, tokenizer_config.json and
chat_template.jinja from the converted model in ~/.cache/abm/models); the
models are random weights of real shapes built on the GPU. It prints:

1. Tokens: a small shape in float32, greedy, 32 new tokens, batches of 1, 7
   and 16: abm's eager, static and compiled paths against transformers'
   ``generate`` (they must agree before the compiled path may become the default).
2. Speed: the Llama-2-7B shape in bfloat16, batches of 1, 7 and 16, 64 new
   tokens: ms per decode step, decisions/s, and the ratio to the bandwidth limit
   (``benchmarks/decode_steps.py``).
3. Out of memory: the 7B shape writes answers to, and scores, 64 prompts in one
   batch; then a tensor fills the GPU but for a few GiB and the same calls run
   again: the batch must be split (``loading()`` says how often) and the scores
   match the unsplit ones up to bfloat16 rounding.

``--quick`` (or a machine without CUDA) runs every part on the small shape in
float32 on the CPU, with few tokens, to check the script itself; part 3 then
has no memory to fill and only runs the calls.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode_steps  # noqa: E402 (a sibling script)

STARTED = time.perf_counter()


def section(title: str) -> None:
    print(f"\n=== {title} (at {time.perf_counter() - STARTED:.0f} s)", flush=True)


def tokens(args: argparse.Namespace, cuda: bool) -> None:
    section("1. tokens: eager, static, compiled and generate agree (small shape, float32)")
    common = ["--device", "cuda" if cuda else "cpu", "--tokenizer", args.tokenizer]
    decode_steps.main(
        [*common, "--shape", "small", "--dtype", "float32", "--repeat", "1"]
        + (["--batch", "1", "7", "16", "--new-tokens", "32"] if not args.quick else [])
        + (["--batch", "1", "3", "--new-tokens", "4"] if args.quick else [])
    )


def speed(args: argparse.Namespace, cuda: bool) -> None:
    section("2. speed: the Llama-2-7B shape, bfloat16")
    common = ["--device", "cuda" if cuda else "cpu", "--tokenizer", args.tokenizer]
    if args.quick:
        decode_steps.main([*common, "--shape", "small", "--batch", "2", "--new-tokens", "4"])
    else:
        decode_steps.main([*common, "--shape", "llama-2-7b", "--batch", "1", "7", "16"])


def out_of_memory(args: argparse.Namespace, cuda: bool) -> None:
    section("3. out of memory: a batch of 64 split, not lost")
    shape = "llama-2-7b" if cuda and not args.quick else "small"
    options = decode_steps.parse(
        ["--device", "cuda" if cuda else "cpu", "--tokenizer", args.tokenizer, "--shape", shape]
    )
    backend = decode_steps.load(options)
    prompts = decode_steps.prompts(backend, 64)
    phrasings = [backend.label_ids(w) for w in ("remain silent", "testify")]
    new = 8 if args.quick else 32
    started = time.perf_counter()
    answers = backend.generate(prompts, max_new_tokens=new, max_batch_size=64)
    scores = backend.score_phrasings(prompts, phrasings, max_batch_size=64)
    print(f"unsplit: 64 answers and scores in {time.perf_counter() - started:.1f} s")
    blocker = None
    if cuda:
        torch.cuda.empty_cache()  # blocks torch keeps would otherwise stay usable
        free = torch.cuda.mem_get_info()[0]
        leave = args.leave_gib * 2**30
        blocker = torch.empty(max(free - leave, 0), dtype=torch.uint8, device="cuda")
        print(f"filled the GPU but for {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB")
    started = time.perf_counter()
    try:
        again = backend.generate(prompts, max_new_tokens=new, max_batch_size=64)
        rescored = backend.score_phrasings(prompts, phrasings, max_batch_size=64)
    except Exception as exc:  # a ScenarioError is the answer for a single prompt too big
        print(f"stopped: {type(exc).__name__}: {exc}")
        return
    finally:
        del blocker
    loading = backend.loading()
    same = sum(a == b for a, b in zip(answers, again, strict=True))
    print(
        f"with the GPU filled: {time.perf_counter() - started:.1f} s; out_of_memory_splits "
        f"{loading.get('out_of_memory_splits', 0)}, batch_cap {loading.get('batch_cap')}; "
        f"{same}/64 greedy answers identical; largest score difference "
        f"{abs(rescored - scores).max():.3g}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a folder of tokenizer files")
    parser.add_argument("--quick", action="store_true", help="small shapes: check the script")
    parser.add_argument(
        "--leave-gib", type=float, default=4.0, help="GPU memory left free in part 3"
    )
    parser.add_argument(
        "--parts",
        type=int,
        nargs="+",
        choices=(1, 2, 3),
        default=[1, 2, 3],
        help="which checks to run (each compiles its own graphs: a few minutes on a GPU)",
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    if cuda:
        print(torch.cuda.get_device_name(0))
        smi = ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv"]
        print(subprocess.run(smi, capture_output=True, text=True, check=False).stdout.strip())
    for part in sorted(set(args.parts)):
        (tokens, speed, out_of_memory)[part - 1](args, cuda)
    print(f"\ndone in {time.perf_counter() - STARTED:.0f} s")


if __name__ == "__main__":
    main()

"""``python -m abm.finetune TRAIN.jsonl --validation VAL.jsonl --out FOLDER``.

Trains a LoRA adapter on examples exported with ``python -m abm.export RUN
--validation 0.2``, measures how often the model decides like the teacher on the
held-out examples before and after, and writes the adapter folder atomically.
Bad input ends with one ``error:`` paragraph and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from abm.errors import ScenarioError

EXTRA = (
    'python -m abm.finetune needs the finetune extra: pip install -e ".[llm,finetune]" '
    "(torch, transformers, peft, trl, datasets; on a machine without a GPU install the CPU "
    "torch first: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def check_extra() -> None:
    """Refuse, naming the extra, when a library training needs is not installed."""
    import importlib.util

    missing = [
        m
        for m in ("torch", "transformers", "peft", "trl", "datasets")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ScenarioError(f"{', '.join(missing)} not installed; {EXTRA}")


def check_out(out: Path) -> None:
    """An adapter folder is written whole or not at all, and never over another one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScenarioError(
            f"--out {out} already exists and is not an empty folder; give a new folder "
            "(an adapter is never written over another)"
        )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ScenarioError(f"--out {out}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScenarioError(
            f"--out {out}: cannot write in {parent}; give a folder you can write to"
        )


def student_prompt(example: Any, backend: Any, model: str) -> str:
    """The exact input the student reads for an example.

    The teacher's own input where the student is the model it was rendered for; else
    the same conversation in the student's chat format, with the same answer prefix.
    """
    if example.metadata.get("model") == model:
        return example.prompt
    turns = []
    for message in example.messages:
        if message["role"] == "assistant":
            break
        turns.append(message)
    return backend.render(turns, example.answer_prefix)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m abm.finetune",
        description="Train a LoRA adapter on a run's exported decisions and measure agreement.",
    )
    parser.add_argument(
        "train", type=Path, nargs="+", help="training examples (python -m abm.export ... JSONL)"
    )
    parser.add_argument(
        "--validation", type=Path, help="held-out examples: agreement is measured on them"
    )
    parser.add_argument("--out", type=Path, required=True, help="the adapter folder to write")
    parser.add_argument(
        "--model",
        help="the model to train (default: the model the examples were rendered for)",
    )
    parser.add_argument(
        "--loss",
        choices=["sft", "kl"],
        default="sft",
        help="sft: learn the teacher's answers (TRL SFTTrainer); kl: learn its option "
        "probabilities (KL over the two options)",
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default 16)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument(
        "--layers",
        type=int,
        help="put LoRA on the last N transformer layers only (default: all); the layers "
        "below then need no gradients, which makes a step cheaper",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds LoRA's start and the batches")
    parser.add_argument(
        "--max-length", type=int, default=2048, help="the longest example, in tokens"
    )
    parser.add_argument("--device", default="auto", help='"auto", "cpu", "cuda", "cuda:N"')
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument(
        "--quantization",
        choices=["8bit", "4bit"],
        help="QLoRA: the base model in 8 or 4 bits (bitsandbytes, CUDA only)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default as for runs)")
    parser.add_argument(
        "--merged",
        action="store_true",
        help="also write FOLDER/merged: the base model with the adapter merged in, with its "
        'tokenizer (a plain model folder: model = "FOLDER/merged", or an inference server)',
    )
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    for name, value, low in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--rank", args.rank, 1),
        ("--alpha", args.alpha, 1),
        ("--max-length", args.max_length, 8),
        ("--layers", 1 if args.layers is None else args.layers, 1),
    ):
        if value < low:
            raise ScenarioError(f"{name} {value}: must be at least {low}")
    if not 0 < args.learning_rate < 1:
        raise ScenarioError(f"--learning-rate {args.learning_rate}: must be above 0 and below 1")
    if args.merged and args.quantization:
        raise ScenarioError(
            "--merged with --quantization: quantized weights cannot take the adapter in; "
            "merge into a full-precision copy of the base model instead"
        )
    if not 0 <= args.dropout < 1:
        raise ScenarioError(f"--dropout {args.dropout}: must be at least 0 and below 1")


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Train, measure and write the adapter; returns what its card says."""
    _check_numbers(args)
    check_out(args.out)
    check_extra()
    from abm.finetune.data import read_examples

    if args.validation and any(
        args.validation.resolve() == path.resolve() for path in args.train if path.exists()
    ):
        raise ScenarioError(
            f"--validation {args.validation} is also a training file; held-out agreement "
            "must be measured on examples the model was not trained on"
        )
    per_file = {path: read_examples([path]) for path in args.train}
    train = [e for examples in per_file.values() for e in examples]
    held = read_examples([args.validation], "validation data") if args.validation else []
    if args.validation:
        per_file[args.validation] = held
    from tqdm.auto import tqdm

    from abm.finetune import agreement as agree
    from abm.finetune import card
    from abm.finetune.train import TrainConfig, train_kl, train_sft
    from abm.llm.backend import Backend
    from abm.llm.models import DEFAULT_MODEL, file_digest, resolve

    models = {e.metadata.get("model") for e in train} - {None}
    name = args.model or (models.pop() if len(models) == 1 else DEFAULT_MODEL)
    config = TrainConfig(
        loss=args.loss,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        layers=args.layers,
        seed=args.seed,
        max_length=args.max_length,
    )
    started = time.perf_counter()
    backend = Backend(
        resolve(name, "--model"),
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
    )
    backend.set_threads(args.threads)
    model, device = backend.model, backend.device
    prompts = [student_prompt(e, backend, name) for e in train]
    held_prompts = [student_prompt(e, backend, name) for e in held]
    seen = set(prompts)

    def measure(what: str) -> dict[str, Any]:
        distinct = len({(p, e.option_sets) for p, e in zip(held_prompts, held, strict=True)})
        with tqdm(total=distinct, desc=f"agreement {what}", unit="prompt") as bar:
            p_c = agree.p_cooperate(backend, held_prompts, held, progress=bar)
        return agree.agreement(held, p_c, held_prompts, seen)

    before = measure("before") if held else None
    if args.quantization:
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing drops the shared prefix's cache that --loss kl runs on
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.loss == "sft"
        )
    trained = time.perf_counter()
    if config.loss == "sft":
        model, losses = train_sft(model, backend, prompts, train, config, device=device)
    else:
        model, losses = train_kl(
            model,
            backend,
            prompts,
            train,
            config,
            device=device,
            progress=lambda n: tqdm(total=n, desc="training", unit="step"),
        )
    train_seconds = time.perf_counter() - trained
    model.eval()
    backend.model = model  # the student, adapter on, answers the held-out prompts
    after = measure("after") if held else None
    about = {
        "base_model": name,
        "base_revision": backend.revision,
        "device": device,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "training": vars(config),
        "merged": "merged" if args.merged else None,
        "examples": {"train": len(train), "validation": len(held)},
        "data": [
            {"path": str(p), "examples": len(examples), "sha256": file_digest(p)}
            for p, examples in per_file.items()
        ],
        "loss": {"first": losses[0], "last": losses[-1], "steps": losses},
        "agreement": {"before": before, "after": after} if held else None,
        "seconds": {"train": train_seconds, "total": time.perf_counter() - started},
    }
    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        model.save_pretrained(partial)
        if args.merged:  # last: merging folds the adapter into the weights for good
            model.merge_and_unload().save_pretrained(partial / "merged")
            backend.tokenizer.save_pretrained(partial / "merged")
        card.loss_chart(losses, partial)
        card.write_about(partial, about)
        if args.out.exists():
            args.out.rmdir()  # empty, checked at the start
        os.replace(partial, args.out)
    except OSError as exc:
        raise ScenarioError(
            f"--out {args.out}: cannot write the adapter ({exc.strerror or exc}); nothing "
            "was left behind"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return about


def one_gpu(device: str, environ: MutableMapping[str, str]) -> str:
    """Show the trainer of ``--loss sft`` the one GPU ``device`` names; the device it then uses.

    The Hugging Face trainer takes the first GPU it sees, and spreads the model over
    all it sees (DataParallel): the only sure way to train on GPU N alone is to let
    CUDA see only that one (``CUDA_VISIBLE_DEVICES``, read when CUDA starts; a list
    already there is indexed as torch numbers it). The CPU is left as it is.

    Args:
        device: ``--device``: "auto", "cpu", "cuda" (the first GPU) or "cuda:N".
        environ: The environment to set (``os.environ``), before CUDA starts.

    Returns:
        ``device``, with "cuda:N" now "cuda:0".
    """
    hidden = "CUDA_VISIBLE_DEVICES" in environ and not environ["CUDA_VISIBLE_DEVICES"].strip()
    if device == "cpu" or device.startswith("mps") or hidden:  # hidden: no GPU to pick
        return device
    index = device.partition(":")[2]
    number = int(index) if index.isdigit() else 0
    visible = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if visible:
        if number >= len(visible):
            raise ScenarioError(
                f"--device {device}: CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} "
                f"lets torch see {len(visible)} GPU(s), numbered from 0"
            )
        environ["CUDA_VISIBLE_DEVICES"] = visible[number]
    else:
        environ["CUDA_VISIBLE_DEVICES"] = str(number)
    return "cuda:0" if index.isdigit() else device


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    import warnings

    args = _parser().parse_args(argv)
    # peft and TRL ask transformers deprecated questions on every step; not the user's
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.loss == "sft":  # before anything starts CUDA
            args.device = one_gpu(args.device, os.environ)
        about = finetune(args)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no adapter was written", file=sys.stderr)
        return 130
    loss = about["loss"]
    line = f"adapter written to {args.out}: loss {loss['first']:.4f} -> {loss['last']:.4f}"
    if about["agreement"]:
        before, after = about["agreement"]["before"], about["agreement"]["after"]
        if after["agree"] is not None:
            line += (
                f"; agreement with the teacher on {after['n']} held-out decisions "
                f"{before['agree']:.1%} -> {after['agree']:.1%}"
            )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

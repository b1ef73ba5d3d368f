"""``python -m abm.export RUN_DIR --format sft``: LLM transcripts as fine-tuning data."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from abm.atomic import atomic_file
from abm.errors import ScenarioError


def read_transcripts(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The exchanges of a run, one dict per LLM decision."""
    path = run_dir / "transcripts.jsonl"
    if not path.is_file():
        raise ScenarioError(f"{run_dir}: no transcripts.jsonl here; only runs with an LLM "
                            "player have one")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScenarioError(f"{path}: line {number} is not JSON ({exc})") from None


def sft_examples(records: Iterator[dict[str, Any]], *, valid_only: bool = False,
                 model: str | None = None, player: str | None = None,
                 reflections: bool = False) -> Iterator[dict[str, Any]]:
    """Chat-format examples: the prompt messages and the model's answer (and, with
    ``reflections``, the reflection turn that followed it)."""
    for r in records:
        if valid_only and not r.get("valid", False):
            continue
        if model is not None and r.get("model") != model:
            continue
        if player is not None and r.get("player") != player:
            continue
        messages = [*r["prompt"], {"role": "assistant", "content": r["response"]}]
        if reflections and r.get("reflection"):
            messages += [{"role": "user", "content": r["reflection_prompt"]},
                         {"role": "assistant", "content": r["reflection"]}]
        yield {"messages": messages,
               "metadata": {k: r.get(k) for k in ("model", "player", "opponent_player",
                                                  "step", "match", "round", "action", "valid")}}


def export_sft(run_dir: Path, out: Path, **filters: Any) -> int:
    """Write the examples to ``out`` atomically; return how many were written."""
    count = 0
    with atomic_file(out) as partial, open(partial, "w", encoding="utf-8") as handle:
        for example in sft_examples(read_transcripts(run_dir), **filters):
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m abm.export",
                                     description="Export a run's LLM exchanges.")
    parser.add_argument("run_dir", type=Path, help="an output folder of python -m abm.run")
    parser.add_argument("--format", choices=["sft"], default="sft",
                        help="sft: chat-format JSONL for supervised fine-tuning")
    parser.add_argument("--out", type=Path, help="output file (default RUN_DIR/sft.jsonl)")
    parser.add_argument("--valid-only", action="store_true",
                        help="leave out answers that could not be parsed")
    parser.add_argument("--model", help="only exchanges with this model")
    parser.add_argument("--player", help="only exchanges of this player name")
    parser.add_argument("--reflections", action="store_true",
                        help="append each reflection turn to its example")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "sft.jsonl"
    try:
        n = export_sft(args.run_dir, out, valid_only=args.valid_only, model=args.model,
                       player=args.player, reflections=args.reflections)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} examples written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

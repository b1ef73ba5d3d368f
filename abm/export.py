"""``python -m abm.export RUN_DIR --format sft``: LLM transcripts as fine-tuning data.

Answers that could not be read (``valid`` false) are left out unless
``--include-invalid``; ``--valid-only`` is accepted and changes nothing (given with
``--include-invalid`` it is refused as a contradiction). Bad input (no run folder, a
transcript line that is not an exchange, an ``--out`` that cannot be written) ends
with one ``error:`` paragraph and exit status 2, and no output file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Collection, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from abm.atomic import atomic_file
from abm.errors import ScenarioError

REQUIRED = ("prompt", "response")  # what an example is made of


def _problem(record: Any) -> str | None:
    """What keeps one transcript line from being an LLM exchange, or None."""
    if not isinstance(record, dict):
        kind = {
            list: "an array",
            str: "a string",
            bool: "a boolean",
            type(None): "null",
            int: "a number",
            float: "a number",
        }.get(type(record), type(record).__name__)
        return f"is {kind}, not an object"
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return "lacks " + " and ".join(repr(k) for k in missing)
    prompt = record["prompt"]
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return 'has a \'prompt\' that is not a list of {"role": ..., "content": ...} messages'
    if not isinstance(record["response"], str):
        return "has a 'response' that is not a string"
    if record.get("reflection") and not isinstance(record.get("reflection_prompt"), str):
        return "has a 'reflection' but no 'reflection_prompt' string"
    return None


def check_run_dir(run_dir: Path) -> Path:
    """The path of a run's transcripts.jsonl.

    Raises:
        ScenarioError: ``run_dir`` is missing, is a file, or has no transcripts.jsonl.
    """
    if not run_dir.exists():
        raise ScenarioError(
            f"{run_dir}: no such folder; give the output folder of a run "
            "(python -m abm.run SCENARIO --out FOLDER)"
        )
    if not run_dir.is_dir():
        raise ScenarioError(
            f"{run_dir} is a file, not a run folder; give the output folder "
            "of a run, the one that holds transcripts.jsonl"
        )
    path = run_dir / "transcripts.jsonl"
    if not path.is_file():
        raise ScenarioError(
            f"{run_dir}: no transcripts.jsonl here; only runs with an LLM player have one"
        )
    return path


def read_transcripts(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The exchanges of a run, one dict per LLM decision, read lazily.

    Blank lines are skipped.

    Args:
        run_dir: The run folder.

    Yields:
        Each transcript line as a dict with at least ``prompt`` (chat messages) and
        ``response``.

    Raises:
        ScenarioError: The folder has no readable transcripts.jsonl, or a line is not
            UTF-8, not JSON or not an exchange (the message names the file and line).
    """
    path = check_run_dir(run_dir)
    shape = (
        "each line must be one LLM exchange as python -m abm.run writes it: a JSON "
        "object with at least 'prompt' (the chat messages) and 'response' (the "
        "model's answer)"
    )
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ScenarioError(
                    f"{path}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                    f"at column {exc.start + 1}); transcripts are written as UTF-8, so this "
                    "file was changed or damaged after the run"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScenarioError(f"{path}: line {number} is not JSON ({exc}); {shape}") from None
            problem = _problem(record)
            if problem:
                raise ScenarioError(f"{path}: line {number} {problem}; {shape}")
            yield record


METADATA = (
    "model",
    "revision",
    "mode",
    "player",
    "opponent_player",
    "step",
    "match",
    "side",
    "round",
    "action",
    "valid",
    "fallback",
    "input",
    "payoff",
    "opponent_action",
    "rule_teacher",
)
SCORES = ("p_cooperate", "p_defect")  # score mode only


def completion_parts(record: dict[str, Any]) -> tuple[str, list[str], list[float] | None]:
    """What the model wrote after its exact input, the two options' texts, the targets.

    In score mode the input ends with the answer prefix and the answer is the chosen
    option's label, so the completion is that label as it continues the input (a
    space first unless the input ends in white space); the options are both shown
    labels continued the same way. In generate mode the completion is the answer text
    and the options are the labels after one space.

    Returns:
        ``(completion, [C option, D option], [P(C), P(D)] or None)``: the teacher's
        probabilities in score mode; in generate mode the decision read from the
        answer as 1/0; None when the answer could not be read (a fallback rule's
        move included: it is not the model's decision).
    """
    labels = record.get("labels") or ["", ""]
    text = str(record.get("input") or "")
    space = "" if not text or text[-1].isspace() else " "
    if record.get("mode") == "score":
        completion = space + str(record.get("answer") or record["response"])
        options = [space + str(label) for label in labels]
    else:
        completion = record["response"]
        options = [" " + str(label) for label in labels]
    if record.get("valid") is False or record.get("fallback"):
        target = None  # not the model's decision: a fallback rule's move is no target
    elif record.get("p_cooperate") is not None and record.get("p_defect") is not None:
        target = [float(record["p_cooperate"]), float(record["p_defect"])]
    elif record.get("action") in ("C", "D"):
        target = [1.0, 0.0] if record["action"] == "C" else [0.0, 1.0]
    else:
        target = None
    return completion, options, target


def match_key(record: dict[str, Any]) -> tuple[int, int]:
    """The match an exchange belongs to: both sides and every round share it."""
    return int(record.get("step") or 0), int(record.get("match") or 0)


def split_by_match(
    keys: list[tuple[int, int]], validation: float, seed: int = 0
) -> set[tuple[int, int]]:
    """The matches that go to the validation set.

    A ``validation`` share of them, drawn with ``seed``: at least one when there are
    two or more matches and the share is positive, never all of them.
    """
    import numpy as np

    distinct = sorted(set(keys))
    if validation <= 0 or len(distinct) < 2:
        return set()
    n = min(len(distinct) - 1, max(1, round(validation * len(distinct))))
    chosen = np.random.default_rng(seed).permutation(len(distinct))[:n]
    return {distinct[i] for i in chosen}


def sft_examples(
    records: Iterator[dict[str, Any]],
    *,
    include_invalid: bool = False,
    valid_only: bool = False,
    model: str | None = None,
    player: str | None = None,
    opponent: str | None = None,
    rounds: Collection[int] | None = None,
    reflections: bool = False,
) -> Iterator[dict[str, Any]]:
    """Turn exchanges into chat-format fine-tuning examples.

    Answers that could not be read (``valid`` false: left unplayed, or played by the
    fallback rule) are not the model's decision and are left out unless
    ``include_invalid``.

    Args:
        records: Exchanges, as ``read_transcripts`` yields them.
        include_invalid: Keep the answers that could not be read.
        valid_only: The old name of the default; it changes nothing.
        model: Keep only the exchanges with this model.
        player: Keep only the exchanges of this player name.
        opponent: Keep only the exchanges against this player name.
        rounds: Keep only these rounds of a match (1 is the first).
        reflections: Append the reflection turn that followed each answer, where
            there was one.

    Yields:
        ``{"messages", "prompt", "completion", "options", "phrasings", "target",
        "metadata"}``: the chat messages with the model's answer; the exact model
        input as text and what the model wrote after it (``completion_parts``); the
        two options' texts, every phrasing score mode summed for each (score mode,
        else None) and the teacher's probabilities of the two options (soft
        targets); the metadata
        carries the fields of ``METADATA`` and, in score mode, P(C) and P(D).
    """
    del valid_only  # the default now; kept so old callers still work
    for r in records:
        if not include_invalid and r.get("valid") is False:
            continue
        if model is not None and r.get("model") != model:
            continue
        if player is not None and r.get("player") != player:
            continue
        if opponent is not None and r.get("opponent_player") != opponent:
            continue
        if rounds is not None and r.get("round") not in rounds:
            continue
        messages = [*r["prompt"], {"role": "assistant", "content": r["response"]}]
        if reflections and r.get("reflection"):
            messages += [
                {"role": "user", "content": r["reflection_prompt"]},
                {"role": "assistant", "content": r["reflection"]},
            ]
        metadata = {k: r.get(k) for k in METADATA}
        metadata.update({k: r[k] for k in SCORES if r.get(k) is not None})
        completion, options, target = completion_parts(r)
        yield {
            "messages": messages,
            "prompt": r.get("input"),
            "completion": completion,
            "options": options,
            "phrasings": r.get("phrasings"),
            "target": target,
            "metadata": metadata,
        }


def check_out(out: Path, transcripts: Path) -> None:
    """Check that ``out`` can take the export before anything is written.

    Raises:
        ScenarioError: ``out`` is a folder, its folder is missing, is a file or is not
            writable, or it is the run's ``transcripts`` file itself.
    """
    if out.is_dir():
        raise ScenarioError(
            f"--out {out} is a folder; give a file name, such as {out / 'sft.jsonl'}"
        )
    parent = out.parent
    if not parent.exists():
        raise ScenarioError(
            f"--out {out}: the folder {parent} does not exist; create it "
            "first or give a file in an existing folder"
        )
    if not parent.is_dir():
        raise ScenarioError(
            f"--out {out}: {parent} is a file, not a folder; give a file in an existing folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScenarioError(
            f"--out {out}: cannot write in the folder {parent} (it is "
            "read-only to you); give a file in a folder you can write to"
        )
    if out.exists() and out.resolve() == transcripts.resolve():
        raise ScenarioError(
            f"--out {out} is the run's transcripts.jsonl itself; give another file name"
        )


def split_paths(out: Path) -> tuple[Path, Path]:
    """Where a split export writes: ``NAME.train.jsonl`` and ``NAME.validation.jsonl``."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.train.jsonl"), out.with_name(f"{stem}.validation.jsonl")


def export_sft(
    run_dir: Path, out: Path, *, validation: float = 0.0, split_seed: int = 0, **filters: Any
) -> dict[str, int]:
    """Write a run's fine-tuning examples to ``out`` atomically.

    Args:
        run_dir: The run folder.
        out: The JSONL file to write.
        validation: The share of matches held out for validation (0 to 1). When
            positive, ``split_paths(out)`` are written instead of ``out``, the
            examples of one match (both sides, every round) all in one of them.
        split_seed: Seeds which matches are held out.
        **filters: Keyword arguments of ``sft_examples``.

    Returns:
        How many examples each written file got: ``{"all": n}`` or
        ``{"train": n, "validation": m}``.

    Raises:
        ScenarioError: A bad run folder, transcript line or output path; the output
            files then stay as they were (no partial file is left).
    """
    transcripts = check_run_dir(run_dir)
    if not 0.0 <= validation < 1.0:
        raise ScenarioError(
            f"--validation {validation}: the share of matches held out must be at least 0 "
            "and below 1, e.g. 0.2"
        )
    targets = (
        {"all": out}
        if validation <= 0
        else dict(zip(("train", "validation"), split_paths(out), strict=True))
    )
    for path in targets.values():
        check_out(path, transcripts)
    examples = list(sft_examples(read_transcripts(run_dir), **filters))
    held = split_by_match([match_key(e["metadata"]) for e in examples], validation, split_seed)
    if validation > 0 and not held:
        raise ScenarioError(
            f"{run_dir}: --validation needs examples from two matches or more to hold one "
            f"out, and the export has {len({match_key(e['metadata']) for e in examples})}; "
            "widen the filters or leave --validation out"
        )
    counts = dict.fromkeys(targets, 0)
    try:
        with ExitStack() as stack:
            handles = {}
            for part, path in targets.items():
                partial = stack.enter_context(atomic_file(path))
                handles[part] = stack.enter_context(open(partial, "w", encoding="utf-8"))
            for example in examples:
                part = "all"
                if validation > 0:
                    part = "validation" if match_key(example["metadata"]) in held else "train"
                    example["metadata"]["split"] = part
                handles[part].write(json.dumps(example, ensure_ascii=False) + "\n")
                counts[part] += 1
    except OSError as exc:  # a read-only folder root may still enter, a full disk, ...
        raise ScenarioError(
            f"--out {out}: cannot write it ({exc.strerror or exc}); give "
            "a file in a folder you can write to, with space left"
        ) from None
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m abm.export", description="Export a run's LLM exchanges."
    )
    parser.add_argument("run_dir", type=Path, help="an output folder of python -m abm.run")
    parser.add_argument(
        "--format",
        choices=["sft"],
        default="sft",
        help="sft: chat-format JSONL for supervised fine-tuning",
    )
    parser.add_argument("--out", type=Path, help="output file (default RUN_DIR/sft.jsonl)")
    parser.add_argument(
        "--include-invalid",
        action="store_true",
        help="keep answers that could not be read (valid false: left "
        "unplayed or played by the fallback rule); by default they are "
        "left out, since they are not the model's decision",
    )
    parser.add_argument(
        "--valid-only",
        action="store_true",
        help="accepted for compatibility and changes nothing: leaving out "
        "unreadable answers is now the default",
    )
    parser.add_argument("--model", help="only exchanges with this model")
    parser.add_argument("--player", help="only exchanges of this player name")
    parser.add_argument("--opponent", help="only exchanges against this player name")
    parser.add_argument(
        "--round",
        type=int,
        action="append",
        dest="rounds",
        metavar="N",
        help="only this round of each match (1 is the first); give it again for more rounds",
    )
    parser.add_argument(
        "--reflections", action="store_true", help="append each reflection turn to its example"
    )
    parser.add_argument(
        "--validation",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="hold out this share of the matches (e.g. 0.2): writes NAME.train.jsonl and "
        "NAME.validation.jsonl next to --out, every example of a match in the same one",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seeds which matches are held out (default 0)"
    )
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "sft.jsonl"
    try:
        if args.valid_only and args.include_invalid:
            raise ScenarioError(
                "--valid-only and --include-invalid contradict each other; "
                "give --include-invalid alone to keep unreadable answers "
                "(--valid-only is the default and may be left out)"
            )
        counts = export_sft(
            args.run_dir,
            out,
            validation=args.validation,
            split_seed=args.split_seed,
            include_invalid=args.include_invalid,
            model=args.model,
            player=args.player,
            opponent=args.opponent,
            rounds=set(args.rounds) if args.rounds else None,
            reflections=args.reflections,
        )
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "all" in counts:
        print(f"{counts['all']} examples written to {out}")
    else:
        train, held = split_paths(out)
        print(
            f"{counts['train']} examples written to {train}, "
            f"{counts['validation']} to {held} (matches held out whole)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an adapter folder says about itself: the card, the figures, the loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ABOUT = "abm_adapter.json"  # read back by the LLM player to check the base model


def loss_chart(losses: list[float], folder: Path) -> list[str]:
    """``loss.html`` and ``loss.png``: the training loss of each step."""
    import altair as alt
    import pandas as pd

    from abm.charts import save

    data = pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses})
    chart = (
        alt.Chart(data, title="Training loss")
        .mark_line(point=len(losses) <= 60)
        .encode(x=alt.X("step:Q", title="step"), y=alt.Y("loss:Q", title="loss"))
        .properties(width=480, height=240)
    )
    return save(chart, folder, "loss")


def _rate(block: dict[str, Any] | None) -> str:
    if not block or block.get("agree") is None:
        return "–"
    return f"{block['agree']:.1%} of {block['n']}"


def card(about: dict[str, Any]) -> str:
    """The adapter's README.md: base model, data, training, agreement before and after."""
    cfg = about["training"]
    lines = [
        f"# LoRA adapter for {about['base_model']}",
        "",
        f"Trained with `python -m abm.finetune` ({cfg['loss']} loss) on "
        f"{about['examples']['train']} examples; load it in a scenario with "
        f'`model = "{about["base_model"]}"` and `adapter = "<this folder>"`.',
        "",
        f"- base model: `{about['base_model']}` (revision `{about['base_revision']}`)",
        f"- device: {about['device']}, dtype {about['dtype']}"
        + (f", {about['quantization']} weights" if about.get("quantization") else ""),
        f"- steps: {cfg['steps']}, batch {cfg['batch_size']}, learning rate "
        f"{cfg['learning_rate']}, LoRA rank {cfg['rank']}, alpha {cfg['alpha']}, "
        f"dropout {cfg['dropout']}, seed {cfg['seed']}",
        f"- training time: {about['seconds']['train']:.1f} s; loss "
        f"{about['loss']['first']:.4f} (first step) -> {about['loss']['last']:.4f} (last step)",
        "",
        "## Data",
        "",
        "| file | examples | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| {d['path']} | {d['examples']} | `{d['sha256'][:16]}…` |" for d in about["data"]]
    held = about.get("agreement")
    if held:
        before, after = held["before"], held["after"]
        lines += [
            "",
            "## Agreement with the teacher on the held-out examples",
            "",
            "The decision is the likelier option, as score mode reads it: each option's "
            "phrasings summed after the input.",
            "",
            "| | before | after |",
            "|---|---|---|",
            f"| all held-out decisions | {_rate(before)} | {_rate(after)} |",
            f"| where the teacher played C | {_rate(before['by_teacher']['C'])} | "
            f"{_rate(after['by_teacher']['C'])} |",
            f"| where the teacher played D | {_rate(before['by_teacher']['D'])} | "
            f"{_rate(after['by_teacher']['D'])} |",
            f"| prompts not in the training data | {_rate(before.get('unseen'))} | "
            f"{_rate(after.get('unseen'))} |",
            f"| mean probability of the teacher's choice | {before.get('mean_p_teacher', '–')} | "
            f"{after.get('mean_p_teacher', '–')} |",
        ]
    lines += ["", "![training loss](loss.png)", ""]
    return "\n".join(lines)


def write_about(folder: Path, about: dict[str, Any]) -> None:
    """``abm_adapter.json`` (everything, machine-readable) and ``README.md`` (the card)."""
    (folder / ABOUT).write_text(json.dumps(about, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(card(about), encoding="utf-8")

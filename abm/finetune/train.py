"""LoRA training: supervised on the teacher's answers (TRL) or distilled from its probabilities."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import ProgressCallback, TrainerCallback

from abm.errors import ScenarioError
from abm.finetune.data import Example
from abm.finetune.losses import (
    option_batch,
    option_kl,
    option_logprobs,
    option_rows,
    prefix_cache,
    shared_prefix,
)


@dataclass(frozen=True)
class TrainConfig:
    """How the adapter is trained; every field is written to the adapter's card."""

    loss: str = "sft"
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    layers: int | None = None
    seed: int = 0
    max_length: int = 2048


def lora_config(config: TrainConfig, model: Any) -> Any:
    """PEFT's LoRA settings: every linear layer of the transformer, none of the head.

    With ``config.layers``, only the last that many layers get adapters.
    """
    from peft import LoraConfig

    depth = getattr(model.config, "num_hidden_layers", None)
    targets: str | list[str] = "all-linear"
    last = None
    if config.layers is not None and depth:
        last = list(range(max(0, depth - config.layers), depth))
        # layers_to_transform needs the modules named: the linear layers inside the blocks
        head = model.get_output_embeddings()
        targets = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module is not head
            }
        )
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        layers_to_transform=last,
        task_type="CAUSAL_LM",
    )


def too_long(tokens: int, max_length: int) -> ScenarioError:
    """The error for an example longer than ``--max-length``."""
    return ScenarioError(
        f"an example is {tokens} tokens long, more than --max-length {max_length}; "
        "raise --max-length or export shorter prompts (a smaller memory window)"
    )


def sft_rows(
    backend: Any, prompts: Sequence[str], examples: Sequence[Example], max_length: int
) -> list[dict[str, list[int]]]:
    """Pre-tokenized rows for TRL: the exact input, then the answer and an end token.

    Only the answer and the end token are learned (``completion_mask``); the input and
    the answer are tokenized as a run tokenizes them (``backend.tokenize``, then
    ``backend.continuation_ids``: no special tokens added).

    Raises:
        ScenarioError: An example longer than ``max_length`` tokens.
    """
    rows = []
    eos = backend.tokenizer.eos_token_id
    for prompt, example in zip(prompts, examples, strict=True):
        head = backend.tokenize(prompt)
        ids = head + backend.continuation_ids(prompt, example.completion) + [eos]
        if len(ids) > max_length:
            raise too_long(len(ids), max_length)
        rows.append(
            {"input_ids": ids, "completion_mask": [0] * len(head) + [1] * (len(ids) - len(head))}
        )
    return rows


def train_sft(
    model: Any,
    backend: Any,
    prompts: Sequence[str],
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    device: str,
) -> tuple[Any, list[float]]:
    """LoRA supervised fine-tuning with TRL's ``SFTTrainer``, loss on the answers only.

    Returns:
        The PEFT model and the training loss of each step.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(sft_rows(backend, prompts, examples, config.max_length))
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            completion_only_loss=True,
            max_length=None,
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=device == "cpu",
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=backend.tokenizer,
            peft_config=lora_config(config, model),
        )
        # the trainer's own bar prints every step's log as a dict; one bar with the loss
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_LossBar(config.steps))
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return trainer.model, [float(x) for x in losses]


class _LossBar(TrainerCallback):
    """A progress bar over the steps that shows the last loss."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps, desc="training", unit="step")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.n = state.global_step
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def train_kl(
    model: Any,
    backend: Any,
    prompts: Sequence[str],
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    device: str,
    progress: Callable[[int], Any] | None = None,
) -> tuple[Any, list[float]]:
    """LoRA distillation on the teacher's option probabilities (``option_kl``).

    The prompt prefix all examples share (the rules) is run once per step without
    gradients, from the current weights; each example's own tokens and its two
    options run on top of it with gradients. Batches are drawn without replacement
    from a generator seeded with ``config.seed``, epoch after epoch.

    Raises:
        ScenarioError: No example carries the teacher's probabilities.

    Returns:
        The PEFT model and the loss of each step.
    """
    from peft import get_peft_model

    usable = [i for i, e in enumerate(examples) if e.target is not None]
    if not usable:
        raise ScenarioError(
            "--loss kl needs the teacher's option probabilities, and no example has them "
            "(its answers could not be read); use --loss sft"
        )
    rows = option_rows(backend, prompts, [e.options for e in examples])
    longest = max(len(ids) for ids, _ in rows)
    if longest > config.max_length:
        raise too_long(longest, config.max_length)
    prefix = shared_prefix([ids for ids, n in rows], keep=max(n for _, n in rows) + 1)
    if getattr(model, "is_gradient_checkpointing", False):
        prefix = 0  # checkpointed layers run without a cache: every row whole
    pad = backend.tokenizer.pad_token_id or 0
    torch.manual_seed(config.seed)
    model = get_peft_model(model, lora_config(config, model))
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses = []
    bar = progress(config.steps) if progress else None
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += [usable[i] for i in torch.randperm(len(usable), generator=generator)]
        pick, order = order[: config.batch_size], order[config.batch_size :]
        part = [rows[2 * i + o] for i in pick for o in (0, 1)]
        batch = option_batch(part, prefix, pad, device)
        cache = prefix_cache(model, rows[0][0][:prefix], len(part), device) if prefix else None
        target = torch.tensor([examples[i].target for i in pick], device=device)
        loss = option_kl(target, option_logprobs(model, batch, cache))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return model, losses

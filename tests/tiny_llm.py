"""A tiny, randomly initialised Llama model with a word-level tokenizer, built offline.

The tokenizer splits on whitespace and punctuation (``Whitespace`` pre-tokenizer)
and knows every word of the two prompt templates, so label strings map to a
chosen number of tokens: "testify" is one token, "remain silent" two,
"testify against Suspect2" three. Chat markers such as ``<|assistant|>`` are
special tokens. Nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIAL = ["[UNK]", "[PAD]", "[BOS]", "[EOS]", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EXTRA_TEXT = """
Suspect1: I want to remain silent or testify against Suspect2. I choose option J or F.
stay keep silent cooperate defect confess testified rules round interrogation history
Police: Please answer with exactly one option. You did this. They did that. Your points
the other player chose score reflection memory game match yes no maybe alpha beta gamma
"""


def _words(text: str) -> list[str]:
    # the same split as tokenizers.pre_tokenizers.Whitespace: \w+|[^\w\s]+
    return re.findall(r"\w+|[^\w\s]+", text)


def vocabulary() -> list[str]:
    from abm.llm.prompts import HERE

    text = EXTRA_TEXT
    for name in ("police.txt", "neutral.txt"):
        text += (HERE / name).read_text(encoding="utf-8")
    words: list[str] = []
    seen = set(SPECIAL)
    pieces = _words(text) + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    pieces += [str(n) for n in range(100)] + list(".,:;!?\"'()-")
    for w in pieces:
        if w not in seen:
            seen.add(w)
            words.append(w)
    return SPECIAL + words


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tokenizer and a random 2-layer Llama to ``folder``; return ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        additional_special_tokens=SPECIAL[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == len(vocab)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # a wider initialisation than the default 0.02 gives peaked next-token
        # distributions, so greedy decoding has no near-ties
        initializer_range=0.5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

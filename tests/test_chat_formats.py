"""The named chat formats against their published strings, transformers, and bad input.

The expected strings are written by hand from the published formats: FastChat's
``vicuna_v1.1`` conversation, Meta's Llama-2 ``chat_completion``, Stanford Alpaca's
``prompt_no_input`` and ChatML.
"""

import jinja2
import pytest

from abm.llm.chat_formats import NAMED, chat_template, render

S, U1, A1, U2 = (
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
)
CHAT = [S, U1, A1, U2]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's "
    "questions."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

# name -> (with the generation prompt, without it), for CHAT
EXPECTED = {
    "vicuna": (
        "<s>S USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT:",
        "<s>S USER: U1 ASSISTANT: A1</s>USER: U2 ",
    ),
    # the generation prompt adds nothing: the user turn already ends with [/INST]
    "llama-2": (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]",
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]",
    ),
    "alpaca": (
        "<s>S\n\n### Instruction:\nU1\n\n### Response:\nA1\n\n### Instruction:\nU2"
        "\n\n### Response:\n",
        "<s>S\n\n### Instruction:\nU1\n\n### Response:\nA1\n\n### Instruction:\nU2",
    ),
    "chatml": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n",
    ),
    "plain": ("<s>S\n\nU1\n\nA1\n\nU2\n\n", "<s>S\n\nU1\n\nA1\n\nU2"),
}


def test_every_named_format_is_tested():
    assert set(EXPECTED) == set(NAMED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_format_renders_the_published_text(name):
    with_prompt, without = EXPECTED[name]
    assert render(NAMED[name], CHAT) == with_prompt
    assert render(NAMED[name], CHAT, add_generation_prompt=False) == without


def test_formats_without_a_system_message():
    chat = [U1, A1, U2]
    assert render(NAMED["vicuna"], chat) == (
        f"<s>{VICUNA_SYSTEM} USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT:"
    )
    assert render(NAMED["llama-2"], chat) == "<s>[INST] U1 [/INST] A1 </s><s>[INST] U2 [/INST]"
    assert render(NAMED["alpaca"], [U1]) == (
        f"<s>{ALPACA_PREAMBLE}\n\n### Instruction:\nU1\n\n### Response:\n"
    )
    assert render(NAMED["chatml"], [U1]) == (
        "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(NAMED["plain"], chat) == "<s>U1\n\nA1\n\nU2\n\n"


def test_plain_is_abms_fallback_text():
    contents = ["rules and history", "Suspect1: I want to testify", "Answer again."]
    chat = [
        {"role": r, "content": c}
        for r, c in zip(("user", "assistant", "user"), contents, strict=True)
    ]
    assert render(NAMED["plain"], chat, bos_token="") == "\n\n".join(contents) + "\n\n"


def test_special_tokens_come_from_the_tokenizer():
    text = render(NAMED["llama-2"], CHAT, bos_token="[BOS]", eos_token="[EOS]")
    assert text == ("[BOS][INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 [EOS][BOS][INST] U2 [/INST]")


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize(
    "chat", [[A1, U2], [U1, U2], [U1, A1, S], [S, S, U1], [U1, {"role": "tool", "content": "x"}]]
)
def test_wrong_role_order_raises(name, chat):
    with pytest.raises(jinja2.TemplateError, match="alternating, starting with user; message"):
        render(NAMED[name], chat)


def test_role_error_names_the_message():
    with pytest.raises(jinja2.TemplateError, match='message 2 has the role "system"'):
        render(NAMED["vicuna"], [S, U1, S])


# ------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pytest.importorskip("torch", reason="needs the llm extra (torch)")
    transformers = pytest.importorskip("transformers", reason="needs the llm extra (transformers)")
    from tiny_llm import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny_llm"))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("chat", [CHAT, CHAT[1:], CHAT[:3]])
@pytest.mark.parametrize("prompt", [True, False])
def test_render_matches_apply_chat_template(tokenizer, name, chat, prompt):
    theirs = tokenizer.apply_chat_template(
        chat, chat_template=NAMED[name], tokenize=False, add_generation_prompt=prompt
    )
    ours = render(
        NAMED[name],
        chat,
        add_generation_prompt=prompt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )
    assert ours == theirs
    assert tokenizer.bos_token == "[BOS]" and "<s>" not in ours  # the tokenizer's, not defaults


def test_wrong_role_order_raises_in_transformers_too(tokenizer):
    with pytest.raises(jinja2.TemplateError, match="alternating"):
        tokenizer.apply_chat_template([A1, U2], chat_template=NAMED["vicuna"], tokenize=False)


# ------------------------------------------------------------------ chat_template()

ALL_NAMES = '"vicuna", "llama-2", "alpaca", "chatml", "plain"'


def test_chat_template_returns_a_named_format():
    assert chat_template("vicuna") is NAMED["vicuna"]


def test_chat_template_reads_a_file_relative_to_base(tmp_path):
    # {% generation %} is transformers' own tag; Hub templates that use it must load
    source = (
        "{% for m in messages %}{% generation %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endgeneration %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (tmp_path / "formats").mkdir()
    (tmp_path / "formats" / "mine.jinja").write_text(source, encoding="utf-8")
    text = chat_template("formats/mine.jinja", base=tmp_path)
    assert text == source
    assert render(text, [U1]) == "<user>U1<assistant>"
    assert chat_template(str(tmp_path / "formats" / "mine.jinja"), base=tmp_path / "x") == source


def test_chat_template_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="neither a named format") as info:
        chat_template("vicuna-v2", base=tmp_path)
    assert ALL_NAMES in str(info.value)


def test_chat_template_missing_file(tmp_path):
    with pytest.raises(ValueError, match="there is no file .*missing.jinja") as info:
        chat_template("missing.jinja", base=tmp_path)
    assert ALL_NAMES in str(info.value)


def test_chat_template_empty_file(tmp_path):
    (tmp_path / "empty.jinja").write_text(" \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jinja is empty") as info:
        chat_template("empty.jinja", base=tmp_path)
    assert ALL_NAMES in str(info.value)


def test_chat_template_unreadable_file(tmp_path):
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    with pytest.raises(ValueError, match="cannot be read .*not UTF-8") as info:
        chat_template("latin1.jinja", base=tmp_path)
    assert ALL_NAMES in str(info.value)


def test_chat_template_jinja_syntax_error(tmp_path):
    (tmp_path / "broken.jinja").write_text(
        "{% for m in messages %}\n{{ m['content'] }", encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"is not valid Jinja \(line 2: ") as info:
        chat_template("broken.jinja", base=tmp_path)
    assert ALL_NAMES in str(info.value)


def test_a_tokenizer_without_bos_or_eos_renders_them_empty():
    messages = [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    # the vicuna format by hand, with "" for both tokens
    want = (
        "A chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: U1 ASSISTANT: A1USER: U2 ASSISTANT:"
    )
    assert render(NAMED["vicuna"], messages, bos_token=None, eos_token=None) == want
    assert render(NAMED["plain"], messages[:1], bos_token=None) == "U1\n\n"


def test_a_misspelt_name_gets_a_suggestion(tmp_path):
    # the scenario loader turns an unknown name into a path next to the scenario
    with pytest.raises(ValueError, match="did you mean 'vicuna'"):
        chat_template(str(tmp_path / "vicunaa"))

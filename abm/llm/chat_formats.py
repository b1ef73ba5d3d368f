"""Named chat formats for models whose tokenizer has no chat template.

A scenario selects one with ``chat_template = "vicuna"`` (or a path to a Jinja file);
:func:`chat_template` turns that value into Jinja source, and :func:`render` renders it
the way ``transformers`` renders ``tokenizer.apply_chat_template``, so the same source can
also be set as ``tokenizer.chat_template``.

Every named format takes an optional system message first, then user and assistant
messages alternating from user; any other order raises ``jinja2.TemplateError`` (as
``transformers`` does for its own templates). The formats:

``vicuna``   FastChat's ``vicuna_v1.1`` (lmsys/vicuna-*-v1.1/v1.3/v1.5).
``llama-2``  Meta's Llama-2-chat ``[INST]`` format; the generation prompt adds nothing,
             because a user turn already ends with ``[/INST]``.
``alpaca``   Stanford Alpaca's instruction prompt, its blocks repeated for later turns.
``chatml``   ``<|im_start|>role ... <|im_end|>`` (OpenAI ChatML, Qwen, many fine-tunes).
``plain``    no markers, for base models: the bos token, then the system message and every
             message's content separated by blank lines, and a blank line as the generation
             prompt. This is exactly what abm sends when a tokenizer has no template, and
             roles get no "User:"/"Assistant:" labels because abm's framings already voice
             the turns ("Police: ..." questions, "Suspect1: I want to" answer prefixes, and
             recorded answers that start with that prefix); a second voice would clash.

``vicuna``, ``llama-2``, ``alpaca`` and ``plain`` start with ``bos_token`` because their
models were trained on text that began with it, and ``apply_chat_template`` tokenizes
without adding special tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from abm.validation import did_you_mean

# Splits off the system message (DEFAULT when there is none) and leaves the rest in `turns`.
_SPLIT = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = DEFAULT -%}
    {%- set turns = messages -%}
{%- endif -%}
"""
# Inside the loop over `turns`: the formats only make sense for user/assistant pairs.
_CHECK = r"""
    {%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
        {{- raise_exception('Chat messages must be an optional system message, then user and '
            ~ 'assistant messages alternating, starting with user; message '
            ~ (messages|length - turns|length + loop.index0)
            ~ ' has the role "' ~ m['role'] ~ '"') -}}
    {%- endif -%}
"""


# a tokenizer without a bos or eos token passes None (or nothing): render it as ""
_TOKENS = (
    "{%- set bos_token = bos_token if bos_token is defined and bos_token else '' -%}\n"
    "{%- set eos_token = eos_token if eos_token is defined and eos_token else '' -%}\n"
)


def _build(head: str, user: str, assistant: str, prompt: str, default: str = "none") -> str:
    """Jinja source from Jinja expressions for the start, each turn and the generation prompt."""
    return (
        _TOKENS
        + _SPLIT.replace("DEFAULT", default)
        + "{{- "
        + head
        + " -}}\n"
        + "{%- for m in turns -%}"
        + _CHECK
        + "    {%- if m['role'] == 'user' -%}{{- "
        + user
        + " -}}\n"
        + "    {%- else -%}{{- "
        + assistant
        + " -}}{%- endif -%}\n"
        + "{%- endfor -%}\n"
        + "{%- if add_generation_prompt -%}{{- "
        + prompt
        + " -}}{%- endif -%}\n"
    )


NAMED: dict[str, str] = {
    # FastChat fastchat/conversation.py, "vicuna_v1.1": sep_style ADD_COLON_TWO, sep=" ",
    # sep2="</s>", roles USER/ASSISTANT, so system + " " + "USER: u " + "ASSISTANT: a</s>" ...
    # and "ASSISTANT:" to prompt. Contents are not stripped (FastChat does not strip).
    "vicuna": _build(
        "bos_token + system + ' '",
        "'USER: ' + m['content'] + ' '",
        "'ASSISTANT: ' + m['content'] + eos_token",
        "'ASSISTANT:'",
        default='"A chat between a curious user and an artificial intelligence assistant. '
        "The assistant gives helpful, detailed, and polite answers to the user's "
        'questions."',
    ),
    # Meta's llama/generation.py chat_completion (B_INST/E_INST, B_SYS="<<SYS>>\n",
    # E_SYS="\n<</SYS>>\n\n", each pair encoded with bos and eos, contents stripped), as in the
    # template transformers published for meta-llama/Llama-2-*-chat-hf.
    "llama-2": _build(
        "''",
        "bos_token + '[INST] ' + ((('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n')"
        " if loop.first and system is not none else '') + m['content']).strip() + ' [/INST]'",
        "' ' + m['content'].strip() + ' ' + eos_token",
        "''",
    ),
    # tatsu-lab/stanford_alpaca train.py PROMPT_DICT["prompt_no_input"]; it ends the prompt at
    # "### Response:" and glues the answer on, but the common inference form (and this one)
    # puts the answer on the next line. Later turns repeat the blocks, without eos in between.
    "alpaca": _build(
        "bos_token + system",
        "'\\n\\n### Instruction:\\n' + m['content']",
        "'\\n\\n### Response:\\n' + m['content']",
        "'\\n\\n### Response:\\n'",
        default="'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.'",
    ),
    # ChatML as in the transformers chat-templating docs and Qwen/OpenHermes tokenizers.
    "chatml": _build(
        "('<|im_start|>system\\n' + system + '<|im_end|>\\n') if system is not none else ''",
        "'<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n'",
        "'<|im_start|>assistant\\n' + m['content'] + '<|im_end|>\\n'",
        "'<|im_start|>assistant\\n'",
    ),
    # abm's own fallback ("\n\n".join(contents) + "\n\n"), see the module docstring.
    "plain": _build(
        "bos_token + (system if system is not none else '')",
        "('\\n\\n' if system is not none or not loop.first else '') + m['content']",
        "('\\n\\n' if system is not none or not loop.first else '') + m['content']",
        "'\\n\\n'",
    ),
}


class _Generation(Extension):
    """The ``{% generation %}`` tag of transformers, with its body rendered unchanged.

    transformers uses it to mark assistant text for training masks; it is accepted so
    that Hub templates using it parse.
    """

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: Jinja's own escapes <, >, & and ' for HTML, which prompts must not
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # the settings and globals of transformers' chat-template environment, so that a template
    # renders here exactly as apply_chat_template renders it
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def chat_template(value: str, base: Path | None = None) -> str:
    """The Jinja source a scenario's ``chat_template`` value stands for.

    A name wins over a file of that name.

    Args:
        value: A named format (a key of ``NAMED``) or the path of a Jinja file.
        base: The folder a relative path is relative to (the scenario's folder).

    Returns:
        The named format's source, or the file's text.

    Raises:
        ValueError: In one sentence naming the formats: ``value`` is neither a known
            name nor a file, or the file cannot be read, is empty, or is not valid Jinja.
    """
    if value in NAMED:
        return NAMED[value]
    names = ", ".join(f'"{n}"' for n in NAMED)
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if not path.is_file():
        # the scenario loader made a path of a misspelt name: the hint is on its last part
        hint = did_you_mean(Path(value).name, NAMED)
        raise ValueError(
            f"chat_template {value!r}{hint} is neither a named format ({names}) "
            f"nor a Jinja file (there is no file {path})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problem = "cannot be read (it is not UTF-8 text)"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    else:
        problem = "is empty" if not text.strip() else None
        if problem is None:
            try:
                _compile(text)
            except jinja2.TemplateSyntaxError as exc:
                problem = f"is not valid Jinja (line {exc.lineno}: {exc.message})"
    if problem:
        raise ValueError(
            f"the chat_template file {path} {problem}; use a valid Jinja file "
            f"or a named format ({names})"
        )
    return text


def render(
    template: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> str:
    """The exact text a model receives for these messages.

    It is rendered the way transformers renders chat templates (jinja2
    ImmutableSandboxedEnvironment, trim_blocks=True, lstrip_blocks=True, with
    ``raise_exception``, ``strftime_now``, the ``generation`` tag and transformers'
    ``tojson``).

    Args:
        template: Jinja source, as ``chat_template`` gives it.
        messages: ``{"role": ..., "content": ...}`` dicts.
        add_generation_prompt: End with the opening of the assistant's turn.
        bos_token: The value of ``bos_token`` in the template.
        eos_token: The value of ``eos_token`` in the template.

    Returns:
        The rendered text.

    Raises:
        jinja2.TemplateError: The template calls ``raise_exception`` (the named formats
            do for messages out of order), as in transformers.
    """
    return _compile(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )

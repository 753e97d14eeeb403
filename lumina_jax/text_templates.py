"""System-prompt templates that Lumina-Image 2.0 prepends to every caption (spec §4).

The text encoder sees ``system_prompt + caption`` as one string, tokenised as a whole. The strings
below are the ``system_type`` choices of the original ``sample.py`` (Alpha-VLLM/Lumina-Image-2.0);
``"real"`` is its default and equals the diffusers default. In the paper, Template A is ``"base"`` and
Template B is ``"real"``. ``"align"`` is what ``finetune.py`` uses for items that carry a
``super_high_quality_caption``.

The unconditional (negative / dropped) prompt is the empty string *without* a system prompt, in both
the original and diffusers, so :func:`build_prompt` maps ``""`` to ``""``.
"""

from __future__ import annotations

import difflib
import re

_PROMPT_START = " <Prompt Start> "

SYSTEM_PROMPTS: dict[str, str] = {
    "real": (
        "You are an assistant designed to generate superior images with the superior degree of "
        "image-text alignment based on textual prompts or user prompts." + _PROMPT_START
    ),
    "base": (
        "You are an assistant designed to generate high-quality images based on user prompts."
        + _PROMPT_START
    ),
    "align": (
        "You are an assistant designed to generate high-quality images with the highest degree of "
        "image-text alignment based on textual prompts." + _PROMPT_START
    ),
    "aesthetics": (
        "You are an assistant designed to generate high-quality images with highest degree of "
        "aesthetics based on user prompts." + _PROMPT_START
    ),
    "4grid": (
        "You are an assistant designed to generate four high-quality images with highest degree of "
        "aesthetics arranged in 2x2 grids based on user prompts." + _PROMPT_START
    ),
    "empty": "",
}
"""Template name -> exact prefix string (including the trailing ``" <Prompt Start> "``)."""

DEFAULT_SYSTEM_PROMPT = "real"


def check_template_name(name_or_text: str) -> None:
    """``ValueError`` for a single ASCII word (letters, digits, ``_``, ``-``) that is not a template
    name: a misspelt name (``"realistic"``) would otherwise become the system prompt's text, silently.
    Text in scripts written without spaces (Chinese, Japanese) is text."""
    if name_or_text not in SYSTEM_PROMPTS and re.fullmatch(r"[A-Za-z0-9_-]+", name_or_text):
        close = difflib.get_close_matches(name_or_text, SYSTEM_PROMPTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown system prompt template {name_or_text!r}{hint}; templates: "
                         f"{', '.join(SYSTEM_PROMPTS)}. A custom system prompt is a text with spaces")  # fmt: skip


def system_prompt_problem(name_or_text: object) -> str | None:
    """Why a record's system prompt cannot be used (not a string, a misspelt template name), or
    ``None``; the data loaders skip such records (counted as ``bad_record``) instead of raising."""
    if not isinstance(name_or_text, str):
        return f"system prompt is a {type(name_or_text).__name__}, not a template name or text"
    try:
        check_template_name(name_or_text)
    except ValueError as e:
        return str(e)
    return None


def resolve_system_prompt(name_or_text: str) -> str:
    """The text put before each prompt: the template of a name of :data:`SYSTEM_PROMPTS`; any other text
    as diffusers builds it, ``text + " <Prompt Start> "``, unless it already contains ``<Prompt Start>``
    (then verbatim). One rule for training data, preprocessing and sampling, so a custom system prompt
    means the same tokens in all three; applying it to its own result changes nothing. ``"empty"`` and
    ``""`` mean no system prompt (diffusers would put ``" <Prompt Start> "`` for ``""``). A single word
    that is not a template name is a ``ValueError`` (see :func:`check_template_name`).
    """
    if not isinstance(name_or_text, str):
        raise TypeError(
            f"system prompt must be a template name {sorted(SYSTEM_PROMPTS)} or a string, "
            f"got {type(name_or_text).__name__}"
        )
    check_template_name(name_or_text)
    if name_or_text in SYSTEM_PROMPTS:
        return SYSTEM_PROMPTS[name_or_text]
    if _PROMPT_START.strip() in name_or_text or name_or_text == "":
        return name_or_text
    return name_or_text + _PROMPT_START


def build_prompt(prompt: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT, *, empty_is_unconditional: bool = True) -> str:
    """The exact text fed to the text encoder for ``prompt`` under ``system_prompt``.

    ``prompt`` that is empty or only whitespace is the unconditional prompt and maps to ``""`` with no
    system prompt (as for negative prompts and caption dropout in the original), unless
    ``empty_is_unconditional=False`` (a sampled positive prompt, which always gets the system prompt).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if prompt.strip() == "" and empty_is_unconditional:
        return ""
    return resolve_system_prompt(system_prompt) + prompt

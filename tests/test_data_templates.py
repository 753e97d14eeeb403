"""System-prompt templates (spec §4) and prompt building."""

import os
import re
from pathlib import Path

import pytest

from lumina_jax import text_templates as tt

# Copied from spec §4 (lumina2_spec.md), which quotes the original sample.py / finetune.py.
SPEC_STRINGS = {
    "base": "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start> ",
    "real": "You are an assistant designed to generate superior images with the superior degree of image-text alignment based on textual prompts or user prompts. <Prompt Start> ",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of image-text alignment based on textual prompts. <Prompt Start> ",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of aesthetics based on user prompts. <Prompt Start> ",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of aesthetics arranged in 2x2 grids based on user prompts. <Prompt Start> ",
    "empty": "",
}


def _first_difference(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at char {i}: {a[max(0, i - 10):i + 10]!r} vs {b[max(0, i - 10):i + 10]!r}"
    return f"lengths {len(a)} vs {len(b)}"


@pytest.mark.parametrize("name", sorted(SPEC_STRINGS))
def test_templates_match_spec_character_by_character(name):
    got, want = tt.SYSTEM_PROMPTS[name], SPEC_STRINGS[name]
    assert len(got) == len(want), _first_difference(got, want)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x == y, _first_difference(got, want)


def test_template_names_and_default():
    assert set(tt.SYSTEM_PROMPTS) == set(SPEC_STRINGS)
    assert tt.DEFAULT_SYSTEM_PROMPT == "real"
    # diffusers builds "real" as system_prompt + " <Prompt Start> " + prompt (spec §4).
    diffusers_sys = (
        "You are an assistant designed to generate superior images with the superior degree of "
        "image-text alignment based on textual prompts or user prompts."
    )
    assert tt.build_prompt("a cat") == diffusers_sys + " <Prompt Start> " + "a cat"


def _spec_path():
    candidates = [
        os.environ.get("LUMINA_SPEC"),
        Path(__file__).resolve().parents[1] / "shared" / "docs" / "lumina2_spec.md",
        Path("/work/shared/docs/lumina2_spec.md"),
    ]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    return None


def test_templates_match_the_spec_file_when_available():
    path = _spec_path()
    if path is None:
        pytest.skip("lumina2_spec.md not available")
    text = path.read_text(encoding="utf-8")
    section = text[text.index("## 4. Text encoder"): text.index("## 5. VAE")]
    found = {}
    for m in re.finditer(r'`system_type="(\w+)"`[^\n]*\n\s*`"([^`]*)"`', section):
        found[m.group(1)] = m.group(2)
    for m in re.finditer(r'ORIG `"(\w+)"`: `"([^`]*)"`', section):
        found[m.group(1)] = m.group(2)
    assert {"base", "real", "align", "aesthetics", "4grid", "empty"} <= set(found), found.keys()
    for name, want in found.items():
        assert tt.SYSTEM_PROMPTS[name] == want, (name, _first_difference(tt.SYSTEM_PROMPTS[name], want))


def test_build_prompt_rules():
    assert tt.build_prompt("") == ""
    assert tt.build_prompt("   ", "align") == ""  # unconditional: no system prompt
    assert tt.build_prompt("a dog", "base") == SPEC_STRINGS["base"] + "a dog"
    assert tt.build_prompt("a dog", "empty") == "a dog"
    # custom text as diffusers builds it (the pipeline uses the same function: training and sampling agree)
    custom = "Draw this."
    assert tt.resolve_system_prompt(custom) == "Draw this. <Prompt Start> "
    assert tt.build_prompt("a dog", custom) == "Draw this. <Prompt Start> a dog"
    assert tt.build_prompt("a dog", "Mine <Prompt Start> ") == "Mine <Prompt Start> a dog"  # holds one: verbatim
    assert tt.resolve_system_prompt("") == "" == tt.resolve_system_prompt("empty")  # none (diffusers: separator)
    from lumina_jax.pipeline import resolve_system_prompt as pipeline_rule

    for text in (custom, "Mine <Prompt Start> ", "", "real", "base", "empty"):
        once = tt.resolve_system_prompt(text)
        assert pipeline_rule(text) == once and tt.resolve_system_prompt(once) == once, text  # idempotent
    with pytest.raises(TypeError):
        tt.build_prompt(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tt.resolve_system_prompt(3)  # type: ignore[arg-type]
    # a single word that is not a template is a misspelt name, not text
    with pytest.raises(ValueError, match=r"unknown system prompt template 'aligned' \(did you mean 'align'\?\)"):
        tt.build_prompt("a dog", "aligned")
    with pytest.raises(ValueError, match="unknown system prompt template 'xyz'; templates: real, base"):
        tt.resolve_system_prompt("xyz")
    assert tt.resolve_system_prompt("你是一个生成高质量图像的助手") == "你是一个生成高质量图像的助手 <Prompt Start> "  # text, not a name
    from lumina_jax.data.sources import ListSource

    with pytest.raises(ValueError, match="'rael'"):  # a source's default fails when it is built
        ListSource([], system_prompt="rael")

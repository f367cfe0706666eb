"""Ollama Modelfile: the Go TEMPLATE pieces must reproduce what the Jinja chat templates
render (checked against desktune's own chat templates), with the right stop tokens."""

from __future__ import annotations

import re

import pytest

from desktune.export.modelfile import STYLES, detect_style, go_template, render_modelfile, write_modelfile

CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}]


def _render_jinja(template: str, messages, bos: str) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                            eos_token="")
    return text.removeprefix(bos)  # llama.cpp / Ollama add BOS themselves


@pytest.mark.parametrize("name,style,bos", [("llama-3", "llama-3", "<|begin_of_text|>"), ("chatml", "chatml", ""),
                                           ("qwen3", "chatml", ""), ("gemma-3", "gemma", "<bos>")])
def test_turn_pieces_match_the_jinja_template(name, style, bos):
    from desktune.data import CHAT_TEMPLATES

    jinja = CHAT_TEMPLATES[name].jinja
    found = detect_style(jinja)
    assert found is not None and found.name == style
    expected = "".join(found.turn(m["role"], m["content"]) for m in CHAT) + found.generation_prompt()
    assert _render_jinja(jinja, CHAT, bos) == expected
    assert CHAT_TEMPLATES[name].eos_token in found.stop


@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.name)
def test_go_template_is_balanced_and_uses_the_style(style):
    text = go_template(style)
    actions = re.findall(r"{{-?\s*(\w+)", text)
    assert actions.count("end") == actions.count("if") + actions.count("range")
    assert text.count("{{") == text.count("}}")
    assert "{{ .Content }}" in text and style.suffix in text
    for src, dst in style.roles:
        assert f'eq .Role "{src}" }}}}{dst}' in text


def test_modelfile_lines(tmp_path):
    from desktune.data import CHAT_TEMPLATES

    path = write_modelfile(tmp_path, tmp_path / "tiny.Q8_0.gguf", CHAT_TEMPLATES["llama-3"].jinja,
                           eos_token="<|eot_id|>", parameters={"temperature": 0.6, "num_ctx": 2048})
    text = path.read_text()
    assert text.startswith("FROM ./tiny.Q8_0.gguf\n")
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1  # eos already among the style's stops
    assert "PARAMETER temperature 0.6\n" in text and "PARAMETER num_ctx 2048\n" in text


def test_unknown_template_writes_no_template_but_keeps_eos(caplog):
    text = render_modelfile("m.F16.gguf", "{{ messages }}", eos_token="</s>")
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text
    assert "not recognised" in caplog.text

"""Ollama `Modelfile` for an exported GGUF file.

Ollama templates are Go templates, not Jinja, so the chat template is recognised by its
turn markers (Llama 3 headers, ChatML, Gemma turns, Mistral [INST]) and rewritten from the
pieces below; an unrecognised template is left out (Ollama then falls back to the
template stored in the GGUF file) with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from desktune.log import logger


@dataclass(frozen=True)
class TurnStyle:
    """One chat format: a turn is `prefix(role) + content + suffix`; `roles` renames roles."""

    name: str
    marker: str  # substring of the Jinja template that identifies the style
    prefix: str  # contains "{role}"
    suffix: str
    stop: tuple[str, ...]
    roles: tuple[tuple[str, str], ...] = ()  # (ollama role, rendered role)

    def role(self, role: str) -> str:
        return dict(self.roles).get(role, role)

    def turn(self, role: str, content: str) -> str:
        return self.prefix.format(role=self.role(role)) + content + self.suffix

    def generation_prompt(self) -> str:
        return self.prefix.format(role=self.role("assistant"))


STYLES = (
    TurnStyle("llama-3", "<|start_header_id|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
              ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    TurnStyle("chatml", "<|im_start|>", "<|im_start|>{role}\n", "<|im_end|>\n", ("<|im_end|>", "<|im_start|>")),
    TurnStyle("gemma", "<start_of_turn>", "<start_of_turn>{role}\n", "<end_of_turn>\n",
              ("<end_of_turn>", "<start_of_turn>"), roles=(("assistant", "model"), ("system", "user"))),
)


def detect_style(chat_template: str | None) -> TurnStyle | None:
    if not chat_template:
        return None
    for style in STYLES:
        if style.marker in chat_template:
            return style
    return None


def go_template(style: TurnStyle) -> str:
    """The style as an Ollama (Go text/template) TEMPLATE: every message as a turn, then the
    assistant prefix unless the last message is already the assistant's."""
    role_expr = "{{ .Role }}"
    for src, dst in reversed(style.roles):
        role_expr = f'{{{{ if eq .Role "{src}" }}}}{dst}{{{{ else }}}}' + role_expr + "{{ end }}"
    prefix = style.prefix.replace("{role}", role_expr)
    return (
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{prefix}{{{{ .Content }}}}{style.suffix}"
        f'{{{{- if and $last (ne .Role "assistant") }}}}{style.generation_prompt()}{{{{ end }}}}'
        "{{- end }}"
    )


def render_modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None = None,
                     parameters: Mapping[str, Any] | None = None, system: str | None = None) -> str:
    """Modelfile text: FROM the GGUF file (relative, so the folder can move), TEMPLATE,
    stop tokens and PARAMETER lines (values of lists become one line each)."""
    lines = [f"FROM ./{gguf_name}", ""]
    style = detect_style(chat_template)
    stops: list[str] = []
    if style is not None:
        lines += [f'TEMPLATE """{go_template(style)}"""', ""]
        stops += style.stop
    elif chat_template:
        logger.warning("chat template not recognised for Ollama; the Modelfile has no TEMPLATE "
                       "(Ollama will use the one stored in the GGUF file if it knows it)")
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    for key, value in (parameters or {}).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines).rstrip() + "\n"


def write_modelfile(save_directory: str | Path, gguf_file: str | Path, chat_template: str | None,
                    eos_token: str | None = None, parameters: Mapping[str, Any] | None = None,
                    system: str | None = None) -> Path:
    path = Path(save_directory) / "Modelfile"
    path.write_text(render_modelfile(Path(gguf_file).name, chat_template, eos_token, parameters, system),
                    encoding="utf-8")
    logger.info("wrote %s (ollama create NAME -f %s)", path, path)
    return path

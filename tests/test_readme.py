"""The README's library snippet runs as written, against a local model folder."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    block = re.search(r"<!-- readme-snippet: start -->\n```python\n(.*?)```\n<!-- readme-snippet: end -->", text,
                      re.S)
    assert block, "README lost its snippet markers"
    return block.group(1)


def test_readme_snippet_runs(tiny_model_dir, tmp_path, monkeypatch):
    code = _snippet()
    assert 'model_name="/workspace/work/models/Llama-3.1-8B-Instruct"' in code
    code = code.replace("/workspace/work/models/Llama-3.1-8B-Instruct", tiny_model_dir("llama"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "lora_adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged_model" / "config.json").exists()
    assert namespace["model"].peft_config["default"].r == 16

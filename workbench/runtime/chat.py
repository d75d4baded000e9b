"""Chat prompts: a user message laid out the way an instruct model was trained to read it.

Instruct checkpoints carry their layout as a Jinja template (``chat_template`` in
``tokenizer_config.json``, or ``chat_template.jinja`` beside it). It is rendered here as
transformers' ``apply_chat_template`` renders it: a sandboxed environment with blocks trimmed, the
loop-controls extension, ``raise_exception`` and ``strftime_now``, one user message, and the
opening of the assistant's turn (``add_generation_prompt``). The text already holds the special
tokens it needs (a begin-of-text token), so it is encoded without adding them again.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from workbench.errors import WorkbenchError


def chat_template(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """The checkpoint's chat template and the special tokens it may name (bos_token, eos_token)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config: dict = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise WorkbenchError(f"{config_path} is not readable JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    if not isinstance(template, str) or not template:
        raise WorkbenchError(f"--chat: {model_dir} has no chat template (chat_template in tokenizer_config.json "
                             f"or chat_template.jinja)")

    def special(name: str) -> str:
        value = config.get(name)
        return (value.get("content") or "") if isinstance(value, dict) else (value or "")
    return template, {"bos_token": special("bos_token"), "eos_token": special("eos_token")}


def render_chat(model_dir: str | Path, user_message: str) -> str:
    """``user_message`` as the first user turn of a chat, ending where the assistant's reply begins."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    template, specials = chat_template(model_dir)

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: _dt.datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=[{"role": "user", "content": user_message}],
                                                add_generation_prompt=True, **specials)
    except TemplateError as e:
        raise WorkbenchError(f"--chat: the checkpoint's chat template failed: {e}") from None

"""Chat templates: the checkpoint's `chat_template` from tokenizer_config.json (as DeepSeek-V3 ships it: a Jinja
template over `bos_token`, `messages` and `add_generation_prompt`), rendered in a sandbox the way transformers'
apply_chat_template does; a plain default template for checkpoints without one. The rendered text carries its own
special tokens (the template writes `bos_token`), so it is tokenized without adding any."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import bad_request

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str, origin: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"{origin}: the chat template does not compile ({e})") from None
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    @classmethod
    def load(cls, path: Path, tokenizer: Any, bos_token_id: int | None, eos_token_ids: tuple[int, ...]) -> ChatTemplate:
        """The checkpoint's template (tokenizer_config.json `chat_template`: a string, or a list of {name, template}
        of which "default" is used), else DEFAULT_TEMPLATE. Raises ValueError for a file that is not valid JSON."""
        cfg_path = path / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        source = cfg.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        origin = str(cfg_path) if isinstance(source, str) else "the default chat template"

        def special(key: str, ids: tuple[int, ...]) -> str:
            named = _token(cfg.get(key))
            return named if named is not None else next((t for i in ids if (t := tokenizer.id_to_token(i))), "")

        bos = special("bos_token", (bos_token_id,) if bos_token_id is not None else ())
        return cls(source if isinstance(source, str) else DEFAULT_TEMPLATE, bos, special("eos_token", eos_token_ids),
                   origin)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The prompt text; a template that refuses the conversation (raise_exception, a missing key) is a 400."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except (TemplateError, TypeError, KeyError) as e:
            raise bad_request(f"messages: the chat template cannot render them ({e})", "messages") from None

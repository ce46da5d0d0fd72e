"""Text in and out: the checkpoint's tokenizer.json (via the `tokenizers` library), BOS/EOS and the
chat template from tokenizer_config.json (rendered in a sandboxed jinja2 environment, as
transformers does), and a streaming decoder that emits only text that can no longer change.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from ..errors import CheckpointError, InputError
from .gguf_tokenizer import gguf_tokenizer

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


class Tokenizer:
    def __init__(self, backend, bos_token: str | None, eos_tokens: list[str], add_bos: bool,
                 chat_template: str | None, extra_eos_ids: tuple[int, ...] = (), source: str = "<tokenizer>"):
        self.backend, self.add_bos, self.chat_template, self.source = backend, add_bos, chat_template, source
        self._compiled = None  # the jinja2 template, compiled on first use
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_id = self.token_id(bos_token) if bos_token else None
        ids = [self.token_id(t) for t in eos_tokens] + list(extra_eos_ids)
        self.eos_ids = tuple(sorted({i for i in ids if i is not None}))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; the checkpoint directory must contain tokenizer.json")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses with parse details
            raise CheckpointError(f"{path}: cannot be read as a tokenizers file ({e})") from None
        cfg = _read_json(directory / "tokenizer_config.json")
        gen = _read_json(directory / "generation_config.json")
        eos = _token_list(cfg.get("eos_token"))
        return cls(backend, _token_text(cfg.get("bos_token")), eos, bool(cfg.get("add_bos_token", True)),
                   _template(cfg.get("chat_template"), directory / "tokenizer_config.json"),
                   _id_list(gen.get("eos_token_id")), str(directory))

    @classmethod
    def from_gguf(cls, meta: dict, source: str) -> "Tokenizer":
        """The vocabulary, special tokens and chat template a GGUF carries in its metadata."""
        backend, bos, eos, add_bos, template = gguf_tokenizer(meta, source)
        return cls(backend, bos, eos, add_bos, template, (), source)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text. BOS is prepended per tokenizer_config's add_bos_token (or add_bos), and
        never twice: a chat template that already starts with the BOS text keeps its own."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InputError(f"{self.source}: the checkpoint has no chat_template in tokenizer_config.json; "
                             f"run without --chat")
        try:
            if self._compiled is None:
                self._compiled = _jinja_env().from_string(self.chat_template)
            # tools/documents are None as transformers passes them: templates test `tools is not none`
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except Exception as e:  # a template error must name the template, not crash obscurely
            raise InputError(f"{self.source}: chat_template failed to render: {e}") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """push(id) returns the text that became final, held back while it ends in an incomplete UTF-8
    character. Decodes only a short window of recent ids (the incremental scheme of vLLM and HF's
    streamers): `prefix` ids give context for decoders that treat a leading space specially."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0    # ids[prefix:read] were already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _token_text(tok: Any) -> str | None:
    """bos/eos tokens appear as a string or as {"content": ...} (AddedToken) in real configs."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _token_list(tok: Any) -> list[str]:
    text = _token_text(tok)
    return [text] if text else []


def _id_list(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int))
    return ()


def _template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    raise CheckpointError(f"{path}: 'chat_template' must be a string or a list of named templates")


def _jinja_env():
    """The environment transformers renders chat templates in (untrusted code from the Hub, so
    sandboxed): loop controls, a tojson that keeps non-ASCII, raise_exception and strftime_now."""
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env

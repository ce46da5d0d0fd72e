"""Text in and out: the checkpoint's tokenizer.json (via the `tokenizers` library) or, without one, its
tiktoken.model (Kimi-K2's, via the `tiktoken` package: checkpoint/tiktoken_tokenizer.py), BOS/EOS and the
chat template (rendered by checkpoint/chat_template.py in jinja2's sandbox under TemplateLimits, as
transformers renders it), and a streaming decoder that emits only text that can no longer change.

The chat template is chat_template.jinja beside tokenizer_config.json when there is one (newer HF
releases and Kimi ship it so; transformers gives that file priority over tokenizer_config.json's
chat_template, and so does this), else tokenizer_config.json's chat_template (a string, or the
"default" of a list of {"name", "template"}).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from ..errors import CheckpointError, InputError
from .chat_template import Overrun, TemplateLimitError, TemplateLimits, compile_template, render
from .gguf_tokenizer import gguf_tokenizer
from .tiktoken_tokenizer import tiktoken_backend

TIKTOKEN_FILE = "tiktoken.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"   # transformers' name (utils/hub.py: CHAT_TEMPLATE_FILE)

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


class Tokenizer:
    def __init__(self, backend, bos_token: str | None, eos_tokens: list[str], add_bos: bool,
                 chat_template: str | None, extra_eos_ids: tuple[int, ...] = (), source: str = "<tokenizer>",
                 template_source: str | None = None):
        self.backend, self.add_bos, self.chat_template, self.source = backend, add_bos, chat_template, source
        self.template_source = template_source or f"{source}: chat_template"  # where errors say it came from
        self._compiled = None  # the template's code (compile_template), compiled on first use
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_id = self.token_id(bos_token) if bos_token else None
        ids = [self.token_id(t) for t in eos_tokens] + list(extra_eos_ids)
        self.eos_ids = tuple(sorted({i for i in ids if i is not None}))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path, tiktoken_path = directory / "tokenizer.json", directory / TIKTOKEN_FILE
        cfg_path, gen_path = directory / "tokenizer_config.json", directory / "generation_config.json"
        if path.is_file():
            cfg, gen = _read_json(cfg_path), _read_json(gen_path)
            backend = _read_backend(path)
            add_bos = cfg.get("add_bos_token", True)
        elif tiktoken_path.is_file():   # Kimi-K2: tiktoken.model + tokenizer_config.json's added tokens
            cfg, gen = _read_json(cfg_path), _read_json(gen_path)
            backend = tiktoken_backend(tiktoken_path, cfg, cfg_path)
            add_bos = cfg.get("add_bos_token", False)   # Kimi's TikTokenTokenizer adds no BOS
        else:
            raise CheckpointError(f"{path}: not found; the checkpoint directory must contain tokenizer.json "
                                  f"(or, for a tiktoken vocabulary as Kimi-K2 ships, {TIKTOKEN_FILE})")
        add_bos = False if add_bos is None else add_bos   # null: off, as transformers reads it
        if not isinstance(add_bos, bool):
            raise CheckpointError(f"{cfg_path}: 'add_bos_token' must be true or false, found {_show(add_bos)}")
        template, template_source = _template(cfg.get("chat_template"), cfg_path), f"{cfg_path}: chat_template"
        jinja = directory / CHAT_TEMPLATE_FILE
        if jinja.exists():   # transformers: the file takes priority over tokenizer_config.json's
            template, template_source = _template_file(jinja), str(jinja)
        return cls(backend, _token_text(cfg, "bos_token", cfg_path), _token_list(cfg, "eos_token", cfg_path),
                   add_bos, template, _id_list(gen, "eos_token_id", gen_path), str(directory), template_source)

    @classmethod
    def from_gguf(cls, meta: dict, source: str) -> "Tokenizer":
        """The vocabulary, special tokens and chat template a GGUF carries in its metadata."""
        backend, bos, eos, add_bos, template = gguf_tokenizer(meta, source)
        return cls(backend, bos, eos, add_bos, template, (), source, f"{source}: tokenizer.chat_template")

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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            limits: TemplateLimits = TemplateLimits()) -> str:
        """The prompt text of `messages`, rendered within `limits` (TemplateLimitError past them)."""
        if not self.chat_template:
            raise InputError(f"{self.source}: the checkpoint has no chat_template (in {CHAT_TEMPLATE_FILE}, "
                             f"tokenizer_config.json or a GGUF's tokenizer.chat_template); run without --chat")
        try:
            if len(self.chat_template) > limits.source_chars:
                raise Overrun(f"is {len(self.chat_template)} characters long (at most {limits.source_chars})")
            if self._compiled is None:
                self._compiled = compile_template(self.chat_template, limits)
            # tools/documents are None as transformers passes them: templates test `tools is not none`
            return render(self._compiled, limits, {
                "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": None,
                "documents": None, "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""})
        except Overrun as e:
            raise TemplateLimitError(f"{self.template_source}: the template {e}; no chat template needs that, this "
                                     f"one is broken or hostile: use the model's own tokenizer_config.json, or run "
                                     f"without --chat") from None
        except Exception as e:  # a template error must name the template, not crash obscurely
            raise InputError(f"{self.template_source}: failed to render: {e}") from None

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


def _read_backend(path: Path):
    """tokenizer.json through the tokenizers library, whose parse errors are plain Exceptions and whose
    Rust panics (some malformed models) are a PanicException, a BaseException."""
    try:
        return Backend.from_file(str(path))
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise                     # KeyboardInterrupt and the like
        raise CheckpointError(f"{path}: cannot be read as a tokenizers file ({_show(str(e), 300)}); the "
                              f"checkpoint's tokenizer.json is damaged: download it again") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, a 5000-digit number, nested too deep
        raise CheckpointError(f"{path}: not valid JSON ({_show(str(e) or type(e).__name__, 300)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _show(value: Any, limit: int = 80) -> str:
    """repr(value), cut short: a message quotes the offending value, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _token_text(cfg: dict[str, Any], key: str, path: Path) -> str | None:
    """bos/eos tokens appear as a string or as {"content": ...} (AddedToken) in real configs."""
    tok = cfg.get(key)
    text = tok.get("content") if isinstance(tok, dict) else tok
    if text is None or isinstance(text, str):
        return _text(text, key, path)
    raise CheckpointError(f"{path}: {key!r} must be a token's text or {{\"content\": text, ...}}, found "
                          f"{_show(tok)}")


def _text(text: str | None, key: str, path: Path) -> str | None:
    """text, once it is text: JSON can escape a lone surrogate (\\ud800), which is no character (the
    tokenizers library refuses it)."""
    try:
        if text is not None:
            text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CheckpointError(f"{path}: {key!r} holds {text[e.start]!r} at character {e.start}, half of a "
                              f"UTF-16 surrogate pair and no character; the file is damaged") from None
    return text


def _token_list(cfg: dict[str, Any], key: str, path: Path) -> list[str]:
    text = _token_text(cfg, key, path)
    return [text] if text else []


def _id_list(cfg: dict[str, Any], key: str, path: Path) -> tuple[int, ...]:
    value = cfg.get(key)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: {key!r} must be a token id or a list of them, found {_show(value)}")
    return tuple(ids)


def _template_file(path: Path) -> str:
    """chat_template.jinja's text: UTF-8, as transformers opens it."""
    try:
        data = path.read_bytes()
    except OSError as e:   # a directory of that name, no permission, an I/O error
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); the chat "
                              f"template file is damaged: download it again") from None
    return text


def _template(value: Any, path: Path) -> str | None:
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        value = {t["name"]: t["template"] for t in value}.get("default")  # [{"name": ..., "template": ...}]
    if value is None or isinstance(value, str):
        return _text(value, "chat_template", path)
    raise CheckpointError(f"{path}: 'chat_template' must be a string or a list of {{\"name\": ..., \"template\": "
                          f"...}}, found {_show(value)}")

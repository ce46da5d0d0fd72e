"""Kimi-K2's tokenizer: `tiktoken.model` (one `base64(token bytes) rank` per line) with the special
tokens of tokenizer_config.json's `added_tokens_decoder`, encoded by the `tiktoken` package as
Kimi's tokenization_kimi.py does (its pre-tokenizer expression KIMI_PAT_STR, 256 reserved special
ids after the ranks, special tokens in text recognised as tokens). TiktokenBackend offers the part of
a `tokenizers.Tokenizer` that checkpoint/tokenizer.py uses.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# tokenization_kimi.py's pat_str, verbatim (fancy-regex syntax: class intersection `&&`, which
# Oniguruma, the `tokenizers` regex engine, reads the same; gguf_tokenizer uses it for "kimi-k2").
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL_TOKENS = 256   # ids n_ranks .. n_ranks+255, named <|reserved_token_{id}|> unless added
# tokenization_kimi.py encodes in slices, as tiktoken overflows its stack on very long runs
# (openai/tiktoken#195): at most 400k characters, and at most 25k consecutive (non-)whitespace ones.
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000


class _Encoding:
    """What `tokenizers.Tokenizer.encode` returns, as far as hetero_rt reads it."""
    __slots__ = ("ids",)

    def __init__(self, ids: list[int]):
        self.ids = ids


class TiktokenBackend:
    """encode / decode / token_to_id / get_vocab_size over a tiktoken Encoding, as the `tokenizers`
    methods of the same names behave for checkpoint/tokenizer.py."""

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], name: str = "tiktoken"):
        try:
            import tiktoken
        except ImportError:
            raise CheckpointError(f"{name}: a tiktoken vocabulary needs the `tiktoken` package, a dependency "
                                  f"of hetero_rt: pip install tiktoken") from None
        self.ranks, self.special = ranks, special
        self.special_ids, self._rank_ids = frozenset(special.values()), frozenset(ranks.values())
        self.model = tiktoken.Encoding(name=name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=special)
        self._size = 1 + max(max(ranks.values(), default=-1), max(special.values(), default=-1))

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        """Ids of text, special tokens written in it becoming their ids (Kimi's encode with
        allow_special_tokens=True, its default). There is no post-processor: add_special_tokens adds nothing."""
        ids: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i:i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids.extend(self.model.encode(piece, allowed_special="all"))
        return _Encoding(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; bytes that end inside a UTF-8 character decode to U+FFFD (the streaming decoder
        holds them back). Ids that are no token are skipped, as `tokenizers` skips them."""
        keep = [int(i) for i in ids if i in self._rank_ids or (not skip_special_tokens and i in self.special_ids)]
        return self.model.decode_bytes(keep).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        return self.ranks.get(token.encode("utf-8", errors="surrogatepass"))

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._size if with_added_tokens else 1 + max(self.ranks.values(), default=-1)


def _split_runs(s: str, limit: int) -> Iterator[str]:
    """s in slices with at most `limit` consecutive whitespace or non-whitespace characters each
    (tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces)."""
    run, space, start = 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        now = ch.isspace()
        if space ^ now:
            run, space = 1, now
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model -> {token bytes: rank}; a malformed line, a duplicate token or rank, or missing
    single bytes raise CheckpointError naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        parts = raw.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise CheckpointError(f"{path}: line {n} is {_cut(raw)}; expected `base64-token rank` (a tiktoken "
                                  f"vocabulary): the file is damaged, download it again")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError(f"{path}: line {n}: {_cut(parts[0])} is not base64; the file is damaged, "
                                  f"download it again") from None
        rank = int(parts[1])
        if not token:
            raise CheckpointError(f"{path}: line {n}: an empty token; the file is damaged, download it again")
        if token in ranks:
            raise CheckpointError(f"{path}: line {n}: token {token!r} was already given rank {ranks[token]}; "
                                  f"the file is damaged, download it again")
        if rank in line_of_rank:
            raise CheckpointError(f"{path}: line {n}: rank {rank} was already given on line {line_of_rank[rank]}; "
                                  f"the file is damaged, download it again")
        ranks[token], line_of_rank[rank] = rank, n
    if not ranks:
        raise CheckpointError(f"{path}: no tokens; expected `base64-token rank` lines (a tiktoken vocabulary)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} of the 256 single bytes have no rank (first: "
                              f"{bytes([missing[0]])!r}); a byte-level BPE needs all of them: the file is damaged")
    return ranks


def special_tokens(ranks: dict[bytes, int], cfg: dict[str, Any], cfg_path: Path) -> dict[str, int]:
    """Kimi's special tokens: the 256 ids after the ranks, named by added_tokens_decoder where it names
    them and <|reserved_token_{id}|> elsewhere, plus any further added token at its id. An id that is
    a rank, or a token at two ids, raises CheckpointError naming tokenizer_config.json."""
    added = cfg.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise CheckpointError(f"{cfg_path}: 'added_tokens_decoder' must be an object of id -> token, found "
                              f"{type(added).__name__}")
    named: dict[int, str] = {}
    for key, tok in added.items():
        content = tok.get("content") if isinstance(tok, dict) else tok
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(content, str) or not content:
            raise CheckpointError(f"{cfg_path}: added_tokens_decoder[{key!r}] must map a token id to "
                                  f"{{\"content\": text, ...}}, found {_cut(repr(tok))}")
        named[int(key)] = content
    rank_ids = set(ranks.values())
    base = 1 + max(rank_ids)
    for i, content in sorted(named.items()):
        if i in rank_ids:
            raise CheckpointError(f"{cfg_path}: added_tokens_decoder gives id {i} to {content!r}, but "
                                  f"tiktoken.model gives that id to a token; the two files do not belong together")
    ids = sorted(set(range(base, base + NUM_RESERVED_SPECIAL_TOKENS)) | set(named))
    special: dict[str, int] = {}
    for i in ids:
        content = named.get(i, f"<|reserved_token_{i}|>")
        if content in special:
            raise CheckpointError(f"{cfg_path}: added_tokens_decoder gives {content!r} both id {special[content]} "
                                  f"and id {i}; the file is damaged")
        special[content] = i
    return special


def tiktoken_backend(model_path: Path, cfg: dict[str, Any], cfg_path: Path) -> TiktokenBackend:
    ranks = read_ranks(model_path)
    special = special_tokens(ranks, cfg, cfg_path)
    try:
        return TiktokenBackend(ranks, special, model_path.name)
    except ValueError as e:   # tiktoken's own checks (the cases above already named their line)
        raise CheckpointError(f"{model_path}: tiktoken refuses the vocabulary ({_cut(str(e), 200)})") from None


def _cut(value: Any, limit: int = 80) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = repr(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."

"""The tokenizer a GGUF carries in its metadata (`tokenizer.ggml.*`), rebuilt as a `tokenizers`
byte-level BPE: tokens, merges, control tokens as special tokens, and the pre-tokenizer llama.cpp
names in `tokenizer.ggml.pre`, with the same split expressions DeepSeek's own tokenizer.json and
Kimi-K2's tokenization_kimi.py use (llama.cpp keeps an equal table). BOS/EOS ids, add_bos and the
chat template come from the same metadata.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import CheckpointError
from .gguf import describe_value, is_integer
from .tiktoken_tokenizer import KIMI_PAT_STR

# tokenizer.ggml.pre -> the regex splits (each 'Isolated') that precede the byte-level mapping.
# "gpt-2" is the plain byte-level pre-tokenizer with its built-in expression.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "deepseek-v3": (
        "\\p{N}{1,3}",
        "[一-龥\u3040-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ),
    "deepseek-llm": (
        "[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅ"
        "ὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎ"
        "ꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ\U00010400-\U0001044f𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-\ud7ff]+",
        "\\p{N}+",
    ),
    # Kimi-K2 (llama.cpp writes its tiktoken ranks as byte-level tokens + merges): tokenization_kimi.py's
    # pat_str, whose class intersections Oniguruma reads as fancy-regex does
    "kimi-k2": (KIMI_PAT_STR,),
}
_CONTROL, _USER_DEFINED = 3, 4


def gguf_tokenizer(meta: dict[str, Any], source: str):
    """-> (tokenizers.Tokenizer, bos text, eos texts, add_bos, chat template) from GGUF metadata.
    Keys of the wrong type (an array of numbers as tokens, a string as a token id) raise CheckpointError
    naming the key."""
    m = _Meta(meta, source)
    kind = m.get("tokenizer.ggml.model", None, _str, "a string")
    if kind != "gpt2":
        raise CheckpointError(f"{source}: tokenizer.ggml.model is {kind!r}; hetero_rt reads byte-level BPE "
                              f"('gpt2') vocabularies, which DeepSeek and Kimi GGUFs use")
    tokens = m.get("tokenizer.ggml.tokens", None, _strings, "an array of strings")
    merges = m.get("tokenizer.ggml.merges", None, _strings, "an array of strings")
    if tokens is None or merges is None:
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens / tokenizer.ggml.merges missing from the metadata")
    types = m.get("tokenizer.ggml.token_type", None, _ints, "an array of integers") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                              f"tokens; expected one per token: the metadata is corrupt")
    pre = m.get("tokenizer.ggml.pre", "gpt-2", _str, "a string")
    backend = _bpe(tokens, merges, source)
    if pre in ("gpt-2", "default"):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise CheckpointError(f"{source}: tokenizer.ggml.pre is {pre!r}; known: gpt-2, "
                              f"{', '.join(PRE_TOKENIZERS)}")
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED) and not t.startswith("[PAD")]
    backend.add_special_tokens(special)
    # an id past the vocabulary is ignored, as llama.cpp does (it warns and keeps its default)
    bos_id = m.get("tokenizer.ggml.bos_token_id", None, _token_id, "a token id (an integer >= 0)")
    eos_id = m.get("tokenizer.ggml.eos_token_id", None, _token_id, "a token id (an integer >= 0)")
    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
    eos = [tokens[eos_id]] if eos_id is not None and eos_id < len(tokens) else []
    add_bos = m.get("tokenizer.ggml.add_bos_token", True, _bool, "a bool")
    return backend, bos, eos, add_bos, m.get("tokenizer.chat_template", None, _str, "a string")


def _bpe(tokens: list[str], merges: list[str], source: str) -> Tokenizer:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for i, merge in enumerate(merges):
        pair = tuple(merge.split(" ", 1))
        if len(pair) != 2:
            raise CheckpointError(f"{source}: tokenizer.ggml.merges[{i}] is {merge!r}; expected two tokens "
                                  f"separated by a space: the metadata is corrupt")
        pairs.append(pair)
    try:
        return Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    except Exception as e:  # the library raises plain Exceptions (a merge of tokens not in the vocabulary)
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens / merges do not make a BPE vocabulary ({e}): "
                              f"the metadata is corrupt") from None


class _Meta:
    """tokenizer.ggml.* values checked for type; a wrong one names the key, what it holds and what was
    expected."""

    def __init__(self, meta: dict[str, Any], source: str):
        self.meta, self.source = meta, source

    def get(self, key: str, default: Any, check, expected: str) -> Any:
        if key not in self.meta or self.meta[key] is None:
            return default
        value = self.meta[key]
        if isinstance(value, Exception):  # a key the gguf package could not decode (gguf._metadata)
            raise CheckpointError(f"{self.source}: {value}")
        if not check(value):
            raise CheckpointError(f"{self.source}: GGUF metadata key '{key}' holds {describe_value(value)}; "
                                  f"expected {expected}: the metadata is corrupt; download the file again")
        return value


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(is_integer(t) for t in v)


def _token_id(v: Any) -> bool:
    return is_integer(v) and v >= 0


def _bool(v: Any) -> bool:
    return isinstance(v, bool)

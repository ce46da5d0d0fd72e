"""The tokenizer a GGUF carries in its metadata (`tokenizer.ggml.*`), rebuilt as a `tokenizers`
byte-level BPE: tokens, merges, control tokens as special tokens, and the pre-tokenizer llama.cpp
names in `tokenizer.ggml.pre`, with the same split expressions DeepSeek's and Kimi's own
tokenizer.json use (llama.cpp keeps an equal table). BOS/EOS ids, add_bos and the chat template
come from the same metadata.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import CheckpointError

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
}
_CONTROL, _USER_DEFINED = 3, 4


def gguf_tokenizer(meta: dict[str, Any], source: str):
    """-> (tokenizers.Tokenizer, bos text, eos texts, add_bos, chat template) from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{source}: tokenizer.ggml.model is {kind!r}; hetero_rt reads byte-level BPE "
                              f"('gpt2') vocabularies, which DeepSeek and Kimi GGUFs use")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens / tokenizer.ggml.merges missing from the metadata")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
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
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    bos = tokens[int(bos_id)] if bos_id is not None and int(bos_id) < len(tokens) else None
    eos = [tokens[int(eos_id)]] if eos_id is not None and int(eos_id) < len(tokens) else []
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    return backend, bos, eos, add_bos, meta.get("tokenizer.chat_template")

"""Kimi-K2's tiktoken tokenizer (tiktoken.model + tokenizer_config.json) on a tiny vocabulary written
here: the 256 single bytes as ranks 0-255 and a few merges, Kimi's special tokens after them. The
oracle is tiktoken itself with tokenization_kimi.py's pat_str, and ids worked out by hand from the
ranks; the same vocabulary as llama.cpp writes it into a GGUF (byte-level tokens and merges,
tokenizer.ggml.pre = "kimi-k2") must encode the same."""
import base64
import json

import pytest
import tiktoken

from hetero_rt.checkpoint.source import DirectorySource
from hetero_rt.checkpoint.tiktoken_tokenizer import KIMI_PAT_STR
from hetero_rt.checkpoint.tokenizer import Tokenizer
from hetero_rt.errors import CheckpointError

# tokenization_kimi.py's pat_str, copied independently of the module under test
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"f\xc3", b"12", b"123", b"\xe4\xb8"]
RANKS = {bytes([b]): b for b in range(256)} | {t: 256 + i for i, t in enumerate(MERGES)}
N = len(RANKS)  # 267: the special ids start here, as Kimi's start at 163584
# Kimi-K2's added_tokens_decoder, at the same offsets from the end of the ranks
SPECIAL = {N: "[BOS]", N + 1: "[EOS]", N + 2: "<|im_end|>", N + 3: "<|im_user|>", N + 4: "<|im_assistant|>",
           N + 10: "<|im_system|>", N + 17: "<|im_middle|>"}
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = N + 2, N + 3, N + 4, N + 10, N + 17
# Kimi-K2's shape (its real template adds a default system prompt and tool calls)
TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- else -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
    "{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
TEXTS = ["hello world", "Hello World's HELLOthere", "café déjà vu", "中文字 and 漢字", "emoji 🙂 ok",
         "12345 678\n\n  indented\tline  ", "", " ", "it'S they'RE", "¿Qué? ¡Sí!", "x<|im_end|>y[EOS]"]


def _reference():
    special = {f"<|reserved_token_{i}|>": i for i in range(N, N + 256)}
    special = {k: v for k, v in special.items() if v not in SPECIAL} | {t: i for i, t in SPECIAL.items()}
    return tiktoken.Encoding("reference", pat_str=PAT_STR, mergeable_ranks=RANKS, special_tokens=special)


def _model_text(ranks=RANKS):
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


def _write(d, model_text=None, special=SPECIAL, **cfg):
    d.mkdir(parents=True, exist_ok=True)
    (d / "tiktoken.model").write_text(_model_text() if model_text is None else model_text)
    config = {"bos_token": "[BOS]", "eos_token": "[EOS]", "chat_template": TEMPLATE,
              "tokenizer_class": "TikTokenTokenizer",
              "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True} for i, t in special.items()}}
    (d / "tokenizer_config.json").write_text(json.dumps(config | cfg))
    return d


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    d = _write(tmp_path_factory.mktemp("kimi"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": IM_END}))
    return d


@pytest.fixture(scope="module")
def tok(kimi_dir):
    return Tokenizer.from_dir(kimi_dir)


def test_pattern_is_kimis():
    assert KIMI_PAT_STR == PAT_STR


def test_ids_by_hand(tok):
    assert tok.encode("hello") == [259]                          # h e l l o -> he l l o -> he ll o -> he llo -> hello
    assert tok.encode("hello world") == [259, 262, ord("l"), ord("d")]   # " w" then "or" then " wor"
    assert tok.encode("café") == [ord("c"), ord("a"), 263, 0xA9]  # é = C3 A9; "f\xc3" is a rank
    assert tok.encode("12345") == [265, ord("4"), ord("5")]      # \p{N}{1,3}: "123" "45"
    assert tok.encode("中") == [266, 0xAD]                         # 中 = E4 B8 AD


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_against_tiktoken(tok, text):
    ref = _reference()
    ids = tok.encode(text)
    assert ids == ref.encode(text, allowed_special="all")
    specials = set(SPECIAL)
    assert tok.decode(ids) == ref.decode([i for i in ids if i not in specials])


def test_special_tokens_and_sizes(tok):
    assert tok.bos_id == N and tok.bos_token == "[BOS]"
    assert tok.eos_ids == (N + 1, IM_END)                         # eos_token and generation_config's id
    assert tok.vocab_size == N + 256                              # 256 reserved special ids, as Kimi's
    assert tok.token_id("<|im_end|>") == IM_END and tok.token_id(f"<|reserved_token_{N + 5}|>") == N + 5
    assert tok.token_id("hello") == 259 and tok.token_id("no such token") is None
    assert tok.encode("a<|im_end|>b") == [ord("a"), IM_END, ord("b")]   # special text is the token
    assert tok.encode("hello") == tok.encode("hello", add_bos=False)    # Kimi adds no BOS by default
    assert tok.encode("hello", add_bos=True) == [N, 259]
    assert tok.decode([ord("a"), IM_END, ord("b"), N + 200, 10**6]) == "ab"   # special and unknown ids dropped
    assert tok.backend.decode([ord("a"), IM_END], skip_special_tokens=False) == "a<|im_end|>"


def test_add_bos_from_config(tmp_path):
    assert Tokenizer.from_dir(_write(tmp_path, add_bos_token=True)).encode("hello") == [N, 259]


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "中文"}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>hello<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>hello world<|im_end|><|im_user|>user<|im_middle|>中文"
                    "<|im_end|><|im_assistant|>assistant<|im_middle|>")
    ids = tok.encode(text)
    assert ids == _reference().encode(text, allowed_special="all")
    assert ids[0] == IM_SYSTEM and ids[-1] == IM_MIDDLE and ids.count(IM_END) == 4 and ids.count(IM_USER) == 2
    tail = [IM_ASSISTANT] + _reference().encode("assistant") + [IM_MIDDLE]
    assert ids[-len(tail):] == tail


def test_chat_template_from_chat_template_jinja(tmp_path, tok):
    """Kimi-K2's newer revisions ship the template as chat_template.jinja, not in tokenizer_config.json."""
    d = _write(tmp_path / "kimi", chat_template=None)
    (d / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    messages = [{"role": "user", "content": "hello"}]
    assert Tokenizer.from_dir(d).apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_streaming_splits_utf8_characters(tok):
    ids = tok.encode("café 中🙂 hello<|im_end|>")
    assert 263 in ids and 266 in ids                               # tokens that end inside a character
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "café 中🙂 hello"
    assert all("\ufffd" not in p for p in pieces)
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in tok.encode("ca")] == ["c", "a"]
    assert dec.push(263) == ""                                    # "f\xc3": é is not complete yet
    assert dec.push(0xA9) == "fé"
    assert [dec.push(i) for i in (0xF0, 0x9F, 0x99)] == ["", "", ""] and dec.push(0x82) == "🙂"


def test_checkpoint_source_finds_it(kimi_dir):
    src = DirectorySource.__new__(DirectorySource)   # its tokenizer() reads only the directory
    src.path = kimi_dir
    assert src.tokenizer().encode("hello") == [259]


# --- the same vocabulary in a GGUF, as llama.cpp's converter writes Kimi-K2's ----------------------

def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _split(token: bytes, max_rank: int) -> list[bytes]:
    """The two parts a merged token was made of: BPE of its bytes with the ranks below its own."""
    parts = [bytes([b]) for b in token]
    while True:
        best = min(((RANKS[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                    if RANKS.get(parts[i] + parts[i + 1], max_rank) < max_rank), default=None)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _gguf_meta():
    b2u = _bytes_to_unicode()
    text = lambda t: "".join(b2u[b] for b in t)
    by_rank = sorted(RANKS, key=RANKS.get)
    merges = []
    for t in by_rank[256:]:
        left, right = _split(t, RANKS[t])
        merges.append(f"{text(left)} {text(right)}")
    special = {i: SPECIAL.get(i, f"<|reserved_token_{i}|>") for i in range(N, N + 256)}
    tokens = [text(t) for t in by_rank] + [special[i] for i in range(N, N + 256)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "kimi-k2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [1] * N + [3] * 256,
            "tokenizer.ggml.bos_token_id": N, "tokenizer.ggml.eos_token_id": IM_END,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE}


@pytest.mark.parametrize("text", TEXTS + ["<|im_user|>user<|im_middle|>hello world<|im_end|>"])
def test_gguf_kimi_k2_pre_tokenizer(text):
    tok = Tokenizer.from_gguf(_gguf_meta(), "kimi.gguf")
    ref = _reference()
    assert tok.encode(text) == ref.encode(text, allowed_special="all")
    ids = ref.encode(text, allowed_special="all")
    assert tok.decode(ids) == ref.decode([i for i in ids if i not in SPECIAL])


# --- errors name the file and line -------------------------------------------------------------------

SWAPPED = {bytes([b]): b for b in range(256)} | {b"he": 1}   # rank 1 given twice (b"\x01" on line 2)


@pytest.mark.parametrize("text, match", [
    ("aGU= 256\naGU=\n" + _model_text(), r"line 2 is 'aGU='; expected `base64-token rank`"),
    ("aGU= x\n" + _model_text(), r"line 1 is 'aGU= x'; expected"),
    ("@@@ 300\n" + _model_text(), r"line 1: '@@@' is not base64"),
    ("aGU= 256\n" + _model_text(), r"line 258: token b'he' was already given rank 256"),  # 1 + 256 bytes + he
    (_model_text(SWAPPED), r"line 257: rank 1 was already given on line 2"),
])
def test_malformed_tiktoken_model(tmp_path, text, match):
    d = _write(tmp_path, text)
    with pytest.raises(CheckpointError, match=match) as e:
        Tokenizer.from_dir(d)
    assert str(d / "tiktoken.model") in str(e.value)


def test_missing_bytes_and_empty_file(tmp_path):
    d = _write(tmp_path / "a", _model_text({bytes([b]): b for b in range(255)}))
    with pytest.raises(CheckpointError, match=r"tiktoken\.model: 1 of the 256 single bytes have no rank"):
        Tokenizer.from_dir(d)
    d = _write(tmp_path / "b", "\n\n")
    with pytest.raises(CheckpointError, match=r"tiktoken\.model: no tokens"):
        Tokenizer.from_dir(d)


def test_special_id_colliding_with_a_rank(tmp_path):
    d = _write(tmp_path, special=SPECIAL | {258: "<|bad|>"})
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: added_tokens_decoder gives id 258 to "
                                              r"'<\|bad\|>', but tiktoken\.model gives that id to a token"):
        Tokenizer.from_dir(d)


def test_special_token_at_two_ids(tmp_path):
    d = _write(tmp_path, special=SPECIAL | {N + 30: "[BOS]"})
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: added_tokens_decoder gives '\[BOS\]' both "
                                              rf"id {N} and id {N + 30}"):
        Tokenizer.from_dir(d)


def test_malformed_added_tokens(tmp_path):
    d = _write(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"added_tokens_decoder": {"x": {"content": "a"}}}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: added_tokens_decoder\['x'\] must map"):
        Tokenizer.from_dir(d)


def test_no_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not found.*tiktoken\.model"):
        Tokenizer.from_dir(tmp_path)

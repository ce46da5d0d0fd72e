"""Tokenizer wrapper against transformers' AutoTokenizer on the same files (the oracle): a small
byte-level BPE trained here, with DeepSeek's special tokens and a BOS post-processor as in the
real tokenizer.json, and a chat template in the shape of DeepSeek-V3's."""
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hetero_rt.errors import CheckpointError, InputError
from hetero_rt.checkpoint.tokenizer import Tokenizer as HrtTokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
# Block tags on their own lines exercise trim_blocks/lstrip_blocks; namespace, loop controls,
# tojson (non-ASCII kept), `tools is not none` and raise_exception are what real templates use.
TEMPLATE = """{% set ns = namespace(system='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.system = ns.system + m['content'] %}
        {% break %}
    {% endif %}
{% endfor %}
{{ bos_token }}{{ ns.system }}
{% if tools is not none %}TOOLS {{ tools | tojson }}{% endif %}
{% for m in messages %}
    {% if m['role'] == 'user' %}
""" + USER + """{{ m['content'] }}
    {% elif m['role'] == 'assistant' %}
""" + ASSISTANT + """{{ m['content'] }}{% if m['meta'] is defined %}{{ m['meta'] | tojson }}{% endif %}{{ eos_token }}
    {% elif m['role'] != 'system' %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
""" + ASSISTANT + """{% endif %}"""
TEXTS = ["hello world, the model reads weights in place", "café déjà vu", "漢字とかな", "emoji 🙂 ok",
         "1234 + 5678", "mixed: naïve 漢字 🙂🚀 end"]
MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello", "meta": {"note": "é 漢"}}, {"role": "user", "content": "café?"}],
]


def train(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(  # as DeepSeek's tokenizer.json: BOS before $A
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tok


def write_dir(d, config, generation_config=None):
    train(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    if generation_config is not None:
        (d / "generation_config.json").write_text(json.dumps(generation_config))
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("tok"), {
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False}, "eos_token": EOS,
        "add_bos_token": True, "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"},
        {"eos_token_id": [1, 3]})


@pytest.fixture(scope="module")
def ref(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


def test_special_ids_and_bos(tok_dir, ref):
    t = HrtTokenizer.from_dir(tok_dir)
    assert t.bos_id == 0 and t.eos_ids == (1, 3) and t.vocab_size == len(ref)
    ids = t.encode("hello world")
    assert ids[0] == 0 and ids.count(0) == 1
    assert t.encode(BOS + "hello") == ids[:1] + t.encode("hello", add_bos=False)
    assert t.encode("hello", add_bos=False)[0] != 0
    chat = t.apply_chat_template(MESSAGES[1])
    assert t.encode(chat).count(0) == 1  # the template's own BOS, not a second one


def test_eos_from_config_alone_and_int_generation_config(tmp_path):
    d = write_dir(tmp_path, {"bos_token": BOS, "eos_token": {"content": EOS}, "add_bos_token": False})
    t = HrtTokenizer.from_dir(d)
    assert t.eos_ids == (1,) and t.encode("hello")[0] != 0
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert HrtTokenizer.from_dir(d).eos_ids == (1, 2)


def test_encode_decode_match_transformers(tok_dir, ref):
    t = HrtTokenizer.from_dir(tok_dir)
    for text in TEXTS:
        assert t.encode(text) == ref.encode(text)
        assert t.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False)
        assert t.decode(t.encode(text)) == text == ref.decode(ref.encode(text), skip_special_tokens=True)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_matches_transformers(tok_dir, ref, messages, gen):
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert HrtTokenizer.from_dir(tok_dir).apply_chat_template(messages, add_generation_prompt=gen) == want
    assert want.startswith(BOS) and want.endswith(ASSISTANT) == gen


def test_named_template_list(tmp_path):
    from transformers import AutoTokenizer
    d = write_dir(tmp_path, {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
                             "chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                               {"name": "default", "template": TEMPLATE}]})
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(MESSAGES[1], tokenize=False,
                                                                add_generation_prompt=True)
    assert HrtTokenizer.from_dir(d).apply_chat_template(MESSAGES[1]) == want


def test_chat_template_jinja_file_takes_priority_as_in_transformers(tmp_path):
    """Newer HF releases (and Kimi) ship the template as chat_template.jinja beside tokenizer_config.json;
    transformers prefers that file to tokenizer_config.json's chat_template, and so do we."""
    from transformers import AutoTokenizer
    d = write_dir(tmp_path, {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
                             "chat_template": "CONFIG'S {{ messages[0]['content'] }}"})
    (d / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(MESSAGES[1], tokenize=False,
                                                                add_generation_prompt=True)
    t = HrtTokenizer.from_dir(d)
    assert t.apply_chat_template(MESSAGES[1]) == want and want.startswith(BOS + "Be brief.")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]                              # the file alone
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert HrtTokenizer.from_dir(d).apply_chat_template(MESSAGES[1]) == want


def test_bad_chat_template_jinja_names_the_file(tmp_path):
    from hetero_rt.errors import HeteroRTError
    d = write_dir(tmp_path, {"bos_token": BOS, "eos_token": EOS, "chat_template": TEMPLATE})
    path = d / "chat_template.jinja"
    path.write_bytes(b"{{ bos_token }}\xff\xfe")          # not UTF-8
    with pytest.raises(CheckpointError, match=f"{path}: not UTF-8 text \\(byte 15"):
        HrtTokenizer.from_dir(d)
    path.write_text("{% for m in messages %}{{ m['content'] }")   # a template that does not parse
    with pytest.raises(InputError, match=f"^{path}: failed to render"):
        HrtTokenizer.from_dir(d).apply_chat_template(MESSAGES[0])
    path.unlink()
    path.mkdir()                                              # there, but not a readable file
    with pytest.raises(CheckpointError, match=f"^{path}: cannot be read") as e:
        HrtTokenizer.from_dir(d)
    assert isinstance(e.value, HeteroRTError)


def test_stream_decoder_never_emits_broken_characters(tok_dir):
    t = HrtTokenizer.from_dir(tok_dir)
    unseen = "Ωmega ünï ∑ 字 🎉🐉 ok"  # not in the training text: its characters stay split into byte tokens
    ids = t.encode(unseen, add_bos=False)
    assert sum(t.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids))) >= 6
    for text in TEXTS + [unseen, " ".join(TEXTS + [unseen])]:
        ids = t.encode(text)
        d = t.stream_decoder()
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == text == t.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 10  # the long text streams, not one piece at the end


def test_stream_decoder_equals_decode_of_any_ids(tok_dir):
    """Ids a model may emit in any order, invalid UTF-8 and special tokens included."""
    t = HrtTokenizer.from_dir(tok_dir)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(t.vocab_size) for _ in range(rng.randint(1, 12))]
        d = t.stream_decoder()
        assert "".join([d.push(i) for i in ids] + [d.flush()]) == t.decode(ids)


def test_errors(tmp_path, tok_dir):
    with pytest.raises(CheckpointError, match="must contain tokenizer.json"):
        HrtTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        HrtTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS}))
    with pytest.raises(InputError, match="no chat_template"):
        HrtTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "chat_template": TEMPLATE}))
    with pytest.raises(InputError, match="unknown role tool"):
        HrtTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "tool", "content": "x"}])
    (tmp_path / "tokenizer.json").write_text("not a tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot be read"):
        HrtTokenizer.from_dir(tmp_path)

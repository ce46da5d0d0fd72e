"""Tokenizer wrapper against transformers' PreTrainedTokenizerFast on the same files (the oracle)."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hetero_rt.errors import CheckpointError, InputError
from hetero_rt.runtime.tokenizer import Tokenizer as HrtTokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}{% else %}" + ASSISTANT +
            "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
TEXTS = ["hello world, the model reads weights in place", "café déjà vu", "漢字とかな", "emoji 🙂 ok", "1234 + 5678"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": BOS, "lstrip": False}, "eos_token": EOS, "add_bos_token": True,
        "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    return d


def test_special_ids_and_bos(tok_dir):
    t = HrtTokenizer.from_dir(tok_dir)
    assert t.bos_id == 0 and t.eos_ids == (1, 3)
    ids = t.encode("hello world")
    assert ids[0] == 0 and ids.count(0) == 1
    assert t.encode(BOS + "hello")[:2].count(0) == 1
    assert t.encode("hello", add_bos=False)[0] != 0


def test_matches_transformers(tok_dir):
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token=BOS, eos_token=EOS)
    t = HrtTokenizer.from_dir(tok_dir)
    for text in TEXTS:
        assert t.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False)
        assert t.decode(t.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "café?"}]
    ref.chat_template = TEMPLATE
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert t.apply_chat_template(messages) == want
    assert want.startswith(BOS) and want.endswith(ASSISTANT)


def test_stream_decoder_never_emits_broken_characters(tok_dir):
    t = HrtTokenizer.from_dir(tok_dir)
    for text in TEXTS:
        ids = t.encode(text, add_bos=False)
        d = t.stream_decoder()
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


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
    (tmp_path / "tokenizer.json").write_text("not a tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot be read"):
        HrtTokenizer.from_dir(tmp_path)

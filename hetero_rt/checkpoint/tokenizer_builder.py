"""A DeepSeek-style tokenizer for synthetic checkpoints, made without downloads: a byte-level BPE
trained on deterministic English-like text generated here, the DeepSeek special tokens
(begin/end of sentence, User, Assistant) and a chat template in DeepSeek-V3's shape."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)  # ids 0..3, in this order
# DeepSeek-V3's shape: BOS, the system prompt(s), then per turn <｜User｜>text /
# <｜Assistant｜>text<｜end▁of▁sentence｜>, and <｜Assistant｜> to prompt a reply.
# Uses only messages, add_generation_prompt, bos_token and eos_token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
_WORDS = (
    "the a an of to in on at by for with from into over under after before between through is are was were "
    "be been has have had do does did can could will would should may might must model expert layer token "
    "weight cache memory host device graph kernel read write load store copy large small quick brown fox dog "
    "jumps lazy every each when where which because while although attention latent router shared routed "
    "prefill decode bandwidth thread core number answer question hello world people run running time data "
    "file place rule plan fits matrix vector tensor block shard index header format value result output "
    "input first second third last next previous morning evening river mountain garden window kitchen "
    "letter story music market city country teacher student doctor friend family history science language "
    "computer network server engine quickly slowly carefully always never often sometimes today tomorrow "
    "yesterday together bright dark warm cold heavy light simple complex early late happy quiet strong "
    "gentle walk talk think know see find give take make build learn teach open close start finish "
    "remember explain describe measure compare choose follow").split()


def corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    """Deterministic English-like training text: sentences of _WORDS with numbers and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        for _ in range(rng.randint(0, 2)):
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(" ".join(words).capitalize() + rng.choice(".?!,;:"))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 2048, *, model_max_length: int = 4096) -> None:
    """Write tokenizer.json (byte-level BPE of exactly vocab_size tokens: BOS id 0, EOS id 1,
    <｜User｜> 2, <｜Assistant｜> 3, the 256 byte symbols, then merges) and tokenizer_config.json into
    out_dir. No post-processor: BOS is added by the runtime, as tokenizer_config's add_bos_token says."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE; expected at least "
                         f"{len(SPECIAL_TOKENS) + 256} (special tokens + 256 bytes)")
    out_dir = Path(out_dir)
    _train(vocab_size).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False))


def _train(vocab_size: int):
    """BPE trained on corpus(), doubled until it has text for vocab_size tokens (the trainer stops early
    when no pair is left to merge), so the vocabulary is exactly vocab_size."""
    n_lines = 600
    while True:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus(n_lines), trainer)
        if tok.get_vocab_size() >= vocab_size or n_lines >= 1 << 20:
            return tok
        n_lines *= 2

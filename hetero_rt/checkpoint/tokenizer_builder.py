"""A DeepSeek-style tokenizer for synthetic checkpoints, made without downloads: a byte-level BPE
trained on deterministic English-like text generated here, the DeepSeek special tokens
(begin/end of sentence, User, Assistant) and a chat template in DeepSeek-V3's shape."""
from __future__ import annotations

import json
import random
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# DeepSeek-V3's shape: BOS, the system prompt(s), then <｜User｜>text / <｜Assistant｜>text<｜end▁of▁sentence｜>
# per turn, and <｜Assistant｜> to prompt a reply. Uses only messages, add_generation_prompt, bos/eos_token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
_WORDS = ("the a model expert layer token weight cache memory host device graph kernel fast slow read "
          "write large small quick brown fox dog jumps over lazy every each when where which because "
          "attention latent router shared routed prefill decode bandwidth thread core number answer "
          "question hello world people run runs running ran time data file place rule plan fits").split()


def corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    """Deterministic English-like training text: sentences from _WORDS with numbers and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        lines.append(" ".join(words).capitalize() + rng.choice(".?!,;:"))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 2048) -> None:
    """Write tokenizer.json (byte-level BPE of at most vocab_size tokens; BOS id 0, EOS id 1, then
    <｜User｜>, <｜Assistant｜>) and tokenizer_config.json into out_dir. No post-processor: BOS is added
    by the runtime, as tokenizer_config's add_bos_token says."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False))

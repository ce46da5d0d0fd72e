"""Generation: greedy decode agrees with transformers' generate; sampling is seeded; eos, context
limits, bad prompts; text streaming; the CLI."""
import json

import re

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.cli import main as cli_main
from hetero_rt.errors import ContextOverflowError, InputError
from hf_models import build_hf_model, save_hf_model

PROMPT = [7, 19, 3, 55, 21]


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    hf = build_hf_model("v2", seed=3)
    return hf, save_hf_model(hf, "v2", tmp_path_factory.mktemp("v2"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


def test_greedy_matches_transformers_generate(v2):
    hf, path = v2
    rt = hetero_rt.load(path, dtype="float32")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(PROMPT):].tolist()
    res = rt.generate(PROMPT, max_new_tokens=12)
    assert res.new_ids == ref
    assert res.stop_reason == "length" and len(set(ref)) > 1


def test_seeded_sampling_is_reproducible(v2):
    rt = hetero_rt.load(v2[1], dtype="float32")
    a = rt.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=11).new_ids
    b = rt.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=11).new_ids
    c = rt.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=12).new_ids
    assert a == b and a != c
    topk1 = rt.generate(PROMPT, max_new_tokens=8, temperature=0.9, top_k=1, seed=4).new_ids
    assert topk1 == rt.generate(PROMPT, max_new_tokens=8).new_ids


def test_stops_on_eos(v2, tmp_path):
    _, path = v2
    greedy = hetero_rt.load(path, dtype="float32").generate(PROMPT, max_new_tokens=6).new_ids
    eos = greedy[2]
    first = greedy.index(eos)
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = hetero_rt.load(tmp_path, dtype="float32").generate(PROMPT, max_new_tokens=6)
    assert res.stop_reason == "eos" and res.new_ids == greedy[:first + 1]


def test_context_limit(v2):
    rt = hetero_rt.load(v2[1], dtype="float32", context=12)
    with pytest.raises(ContextOverflowError, match="needs 13 positions but the KV cache holds 12"):
        rt.generate(PROMPT, max_new_tokens=8)
    with pytest.raises(ContextOverflowError):
        rt.logits(list(range(13)))
    assert rt.generate(PROMPT, max_new_tokens=7).new_ids  # exactly fits


def test_bad_prompts(v2):
    rt = hetero_rt.load(v2[1], dtype="float32")
    with pytest.raises(InputError, match="empty prompt"):
        rt.generate([], max_new_tokens=4)
    with pytest.raises(InputError, match="empty prompt"):
        rt.logits([])
    with pytest.raises(InputError, match=r"token id 96 is outside the vocabulary \[0, 96\)"):
        rt.logits([1, 96])
    with pytest.raises(InputError, match="token id -1"):
        rt.generate([-1], max_new_tokens=2)
    with pytest.raises(InputError, match="no tokenizer.json"):
        rt.generate("hello", max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        rt.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        rt.generate(PROMPT, max_new_tokens=2, temperature=-1)


def test_logits_calls_are_independent(v2):
    rt = hetero_rt.load(v2[1], dtype="float32")
    first = rt.logits(PROMPT)
    rt.generate([9, 9, 9, 9, 9, 9, 9, 9], max_new_tokens=5)
    assert np.array_equal(rt.logits(PROMPT), first)


def test_text_streaming_and_chat(tiny):
    rt = hetero_rt.load(tiny)
    pieces = []
    res = rt.generate("the model reads the weights", max_new_tokens=10, stream=pieces.append)
    assert "".join(pieces) == res.text == rt.tokenizer.decode(res.new_ids)
    assert res.prompt_ids[0] == rt.tokenizer.bos_id
    chat = rt.generate("hello", max_new_tokens=2, chat=True)
    rendered = rt.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    assert chat.prompt_ids == rt.tokenizer.encode(rendered)
    assert chat.prompt_ids.count(rt.tokenizer.bos_id) == 1


def test_cli_run(tiny, capsys):
    assert cli_main(["run", "--model", str(tiny), "--prompt", "hello there", "-n", "5"]) == 0
    err = capsys.readouterr().err
    assert "decode" in err and "tok/s" in err


def test_cli_run_reports_first_token_memory_and_placement(tiny, capsys):
    threads = torch.get_num_threads()
    assert cli_main(["run", "--model", str(tiny), "--prompt", "hello there", "-n", "3", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "placement <device=cpu>: dense part on cpu; routed experts: 1 layer torch on cpu" in err
    ttft = float(re.search(r"time to first token ([0-9.]+) ms", err).group(1))
    rss = re.search(r"peak RSS ([0-9.]+) (MiB|GiB)", err)
    assert 0 < ttft < 60_000 and rss is not None and float(rss.group(1)) > 0


def test_cli_demo_says_its_weights_are_random(tiny, capsys, monkeypatch):
    """The demo on a stand-in checkpoint (the real one is 527 MB): it generates what was asked and says
    that its text is noise."""
    import hetero_rt.cli as cli
    monkeypatch.setattr(cli, "ensure_demo_checkpoint", lambda cache_dir: tiny)
    assert cli_main(["demo", "-n", "3", "--prompt", "hello there"]) == 0
    err = capsys.readouterr().err
    assert "weights are random" in err and "generated 3 tokens" in err and "tok/s" in err


def test_cli_reports_errors(capsys, tmp_path):
    assert cli_main(["run", "--model", str(tmp_path / "missing"), "--prompt", "x", "-n", "2"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_load_argument_errors(v2, tmp_path, capsys):
    with pytest.raises(hetero_rt.HeteroRTError, match="dtype 'int8' not supported"):
        hetero_rt.load(v2[1], dtype="int8")
    (tmp_path / "r.yaml").write_text("defaults: {device: cpu}\nrules: []\n")
    with pytest.raises(hetero_rt.HeteroRTError, match="pass either placement rules or device"):
        hetero_rt.load(v2[1], tmp_path / "r.yaml", device="cpu")
    assert cli_main(["plan", "--model", str(v2[1]), "--write-rules", str(tmp_path / "w.yaml")]) == 2
    assert "--write-rules needs --gpu-mem" in capsys.readouterr().err

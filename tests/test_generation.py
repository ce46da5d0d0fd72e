"""Generation: greedy decode agrees with transformers' generate; sampling is seeded; eos, context
limits, bad prompts; text streaming; the CLI."""
import io
import json
import sys

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


@pytest.mark.parametrize("prompt, message", [
    ([1, 2.0, 3], r"prompt \(token ids\)\[1\] must be an integer, got float"),
    ([1, True], r"prompt \(token ids\)\[1\] must be an integer, got bool"),
    ([1, "2"], r"prompt \(token ids\)\[1\] must be an integer, got str"),
    ([[1, 2], [3, 4]], r"prompt \(token ids\)\[0\] must be an integer, got list"),
    (b"\x01\x02", r"prompt \(token ids\) must be a sequence of integers, got bytes"),
    (np.array([[1, 2]]), r"prompt \(token ids\) must be 1-D, got shape \(1, 2\)"),
    (np.array([1.0, 2.0]), r"prompt \(token ids\) must hold integers, got dtype float64"),
    (torch.tensor([True, False]), r"prompt \(token ids\) must hold integers, got dtype torch.bool"),
    (7, r"prompt \(token ids\) must be a sequence of integers, got int"),
])
def test_token_ids_are_integers_never_converted(tiny, prompt, message):
    rt = hetero_rt.load(tiny)
    with pytest.raises(InputError, match=message):
        rt.generate(prompt, max_new_tokens=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=1.5), "max_new_tokens must be an integer >= 1, got 1.5"),
    (dict(max_new_tokens="4"), "max_new_tokens must be an integer >= 1, got '4'"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(temperature=float("nan")), r"temperature \(0 = greedy\) must be a finite number"),
    (dict(temperature="0.7"), r"temperature \(0 = greedy\) must be a finite number in \[0.0, inf\], got '0.7'"),
    (dict(temperature=None), r"temperature \(0 = greedy\) must be a finite number"),
    (dict(top_p=float("inf")), r"top_p \(1 = off\) must be a finite number in \(0.0, 1.0\]"),
    (dict(top_p=0), r"top_p \(1 = off\) must be a finite number in \(0.0, 1.0\], got 0"),
    (dict(top_k=2.5), r"top_k \(0 = off\) must be an integer >= 0, got 2.5"),
    (dict(top_k=True), r"top_k \(0 = off\) must be an integer >= 0, got True"),
    (dict(seed=1.5), "seed must be an integer or None, got float 1.5"),
    (dict(seed="1"), "seed must be an integer or None, got str '1'"),
    (dict(chat="yes"), "chat must be true or false, got 'yes'"),
])
def test_generation_parameters_are_checked_by_type_and_range(tiny, kwargs, message):
    rt = hetero_rt.load(tiny)
    with pytest.raises(InputError, match=message):
        rt.generate([1, 2, 3], **{"max_new_tokens": 2, **kwargs})


def test_integer_ids_of_any_kind_and_any_integer_seed(tiny):
    rt = hetero_rt.load(tiny)
    ref = rt.generate([5, 17, 99], max_new_tokens=3).new_ids
    for ids in ([np.int64(5), np.int32(17), 99], np.array([5, 17, 99]), torch.tensor([5, 17, 99]), (5, 17, 99)):
        assert rt.generate(ids, max_new_tokens=3).new_ids == ref
    big = rt.generate([5, 17, 99], max_new_tokens=4, temperature=1.0, seed=2 ** 70 + 3).new_ids
    assert rt.generate([5, 17, 99], max_new_tokens=4, temperature=1.0, seed=2 ** 70 + 3).new_ids == big
    assert rt.generate([5, 17, 99], max_new_tokens=4, temperature=1.0, seed=-1).new_ids == \
        rt.generate([5, 17, 99], max_new_tokens=4, temperature=1.0, seed=2 ** 64 - 1).new_ids


def test_ctrl_c_keeps_the_partial_result(tiny):
    """A KeyboardInterrupt during decode (here raised by the stream callback) surfaces as
    GenerationInterrupted carrying the tokens, text and timings so far."""
    from hetero_rt.runtime.request import GenerationInterrupted
    rt = hetero_rt.load(tiny)
    seen = []

    def stream(piece):
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt
    with pytest.raises(GenerationInterrupted) as info:
        rt.generate("the model reads", max_new_tokens=20, stream=stream)
    res = info.value.result
    assert isinstance(info.value, KeyboardInterrupt) and res.stop_reason == "interrupted"
    # the text is what the stream took in: not the piece whose callback raised
    assert 2 <= len(res.new_ids) < 20 and res.text == "".join(seen[:-1]) and res.prefill_s > 0


def test_cli_ctrl_c_prints_one_line_and_the_partial_timings(tiny, capsys, monkeypatch):
    import hetero_rt.cli as cli
    calls = []

    def stream(piece):
        calls.append(piece)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli, "print_stream", stream)
    assert cli_main(["run", "--model", str(tiny), "--prompt", "hello there", "-n", "20"]) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "interrupted after" in lines[0] and "decode" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, kwargs", [
    ([], {}),
    (["--temperature", "0.9", "--top-k", "7", "--top-p", "0.8", "--seed", "11"],
     dict(temperature=0.9, top_k=7, top_p=0.8, seed=11)),
    (["--chat", "--seed", "3", "--temperature", "1.5"], dict(chat=True, seed=3, temperature=1.5)),
], ids=["greedy", "sampling", "chat"])
def test_cli_run_prints_what_generate_returns_with_every_flag(tiny, capsys, flags, kwargs):
    assert cli_main(["run", "--model", str(tiny), "--prompt", "the weights", "-n", "6", "--context", "64",
                     "--dtype", "float32", *flags]) == 0
    out = capsys.readouterr().out
    want = hetero_rt.load(tiny, context=64, dtype="float32").generate("the weights", max_new_tokens=6, **kwargs)
    assert out == want.text + "\n"


def test_rules_override_loads_dtype_and_context_is_forwarded(tiny, tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text("defaults: {device: cpu, dtype: float32}\nrules: []\n")
    rt = hetero_rt.load(tiny, rules, dtype="bfloat16", context=48)
    assert rt.dtype == torch.float32 and rt.cache.max_len == 48
    assert cli_main(["run", "--model", str(tiny), "--prompt", "x " * 30, "-n", "30", "--context", "40",
                     "--rules", str(rules)]) == 2
    assert "40" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_loading_shows_progress_on_a_terminal_only(tiny, monkeypatch):
    """A progress bar (one step per MoE layer's experts, one for the rest) on stderr when it is a
    terminal; nothing at all when it is not (logs, pipes, tests)."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    hetero_rt.load(tiny)
    shown = term.getvalue()
    args = hetero_rt.load(tiny).args
    n_moe = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    assert "loading" in shown and f"{n_moe + 1}/{n_moe + 1}" in shown
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    hetero_rt.load(tiny)
    assert "loading" not in plain.getvalue()

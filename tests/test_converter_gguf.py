"""GGUFs written by llama.cpp's own convert_hf_to_gguf.py (committed fixtures, tests/fixtures/
make_converter_gguf.py) against their exact reference: transformers holding the file's tensors
dequantized by gguf.quants, fp32. These run in every test run, the converter and llama-cpp-python
installed or not; where llama_cpp is importable, its logits on the same files are compared too.

What the converter writes that matters here (measured on these files): it records no norm_topk_prob for
Qwen2-MoE (nor Qwen3-MoE) and no expert groups for GLM-4.5, so a loader can only take llama.cpp's own
choice; 0.3.16's gguf-py names Mixtral's router ffn_gate (refused, as llama.cpp refuses it); a tied
Qwen2-MoE has no output.weight (hetero_rt ties it; llama.cpp 0.3.36 refuses the file)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.checkpoint.gguf import GGUFCheckpoint
from hetero_rt.config import ModelArgs
from hetero_rt.errors import CheckpointError
from hetero_rt.placement.plan import model_modules

FIXTURES = Path(__file__).parent / "fixtures" / "converter"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
IDS = MANIFEST["ids"]
FILES = sorted(MANIFEST["files"])
NORM = "qwen2_moe_norm-f32.gguf"   # its norm_topk_prob is not in the file (test_qwen2_moe_norm_topk_prob_...)
EXACT_FILES = [n for n in FILES if n != NORM]
NUMBA = "defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n" \
        "    place: {device: cpu, backend: numba, threads: 2}\n"
STORED_KINDS = ("attention", "shared_experts", "dense_mlp", "lm_head", "embedding")


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference(name: str) -> np.ndarray:
    return np.load(FIXTURES / name.replace(".gguf", ".logits.npy"))


def exact_rules(path: Path, tmp_path: Path) -> Path:
    """gguf-cpu-exact.yaml for this model's module kinds: every weight in place, fp32 activations."""
    with GGUFCheckpoint(path) as ck:
        kinds = {m.kind for m in model_modules(ck.args())}
    text = "defaults: {device: cpu, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n" \
           "    place: {backend: numba, activations: fp32}\n"
    text += "".join(f"  - match: {{kind: {k}}}\n    place: {{format: stored, activations: fp32}}\n"
                    for k in STORED_KINDS if k in kinds)
    out = tmp_path / "exact.yaml"
    out.write_text(text)
    return out


def load(name: str, how: str, tmp_path: Path):
    path = FIXTURES / name
    if how == "default":                       # the default placement of a GGUF on the CPU
        return hetero_rt.load(path, context=64)
    if how == "exact":
        return hetero_rt.load(path, exact_rules(path, tmp_path), context=64)
    rules = tmp_path / "numba.yaml"            # dense weights dequantized to fp32, experts by numba
    rules.write_text(NUMBA)
    return hetero_rt.load(path, rules, dtype="float32", context=64)


def is_q8(name: str) -> bool:
    return MANIFEST["files"][name]["outtype"] == "q8_0"


@pytest.mark.parametrize("how", ["default", "exact", "numba"])
@pytest.mark.parametrize("name", EXACT_FILES)
def test_converter_file_equals_its_dequantized_reference(name, how, tmp_path):
    rt = load(name, how, tmp_path)
    want = reference(name)
    assert rt.args.model_type == MANIFEST["files"][name]["model_type"]
    got = rt.logits(IDS)
    assert got.shape == want.shape == (len(IDS), rt.args.vocab_size)
    # measured: 1.2e-7 to 3.1e-7 (f32, every placement; Q8_0 in place with fp32 activations, numba);
    # Q8_0 by default (int8 activations): 9.9e-4 (Qwen2-MoE), 4.1e-3 (Qwen3-MoE)
    bound = 2e-2 if how == "default" and is_q8(name) else 1e-5
    assert rel_err(got, want) <= bound, (name, how, rel_err(got, want))


def test_the_references_are_not_degenerate():
    f32 = {n: reference(n) for n in FILES if not is_q8(n)}
    assert all(r.std() > 0.1 and len(set(r.argmax(-1).tolist())) > 3 for r in f32.values())
    for q8 in (n for n in FILES if is_q8(n)):   # the quantization is seen in the reference
        assert rel_err(reference(q8), f32[q8.replace("q8_0", "f32")]) > 1e-4


@pytest.mark.parametrize("name", EXACT_FILES)
def test_cached_decode_equals_the_reference(name, tmp_path):
    rt, want, prefill = load(name, "exact" if is_q8(name) else "default", tmp_path), reference(name), 5
    got = [rt.step(torch.tensor(IDS[:prefill]), 0).numpy()]
    got += [rt.step(torch.tensor([t]), p).numpy() for p, t in enumerate(IDS[prefill:], start=prefill)]
    assert rel_err(np.concatenate(got), want) <= 1e-5


@pytest.mark.parametrize("name", FILES)
def test_metadata_gives_the_configs_args(name):
    """Everything the math reads comes out of the converter's metadata and tensors as out of the
    config.json it converted, except what the converter does not write: norm_topk_prob for Qwen2-MoE
    (llama.cpp's qwen2moe never renormalises, so the file is read so)."""
    fixture = name.rsplit("-", 1)[0]
    want = ModelArgs.from_config_file(FIXTURES / f"{fixture}.config.json")
    with GGUFCheckpoint(FIXTURES / name) as ck:
        got = ck.args()
    skip = {"bos_token_id", "eos_token_ids", "rope_interleave"}
    same = lambda a, b: a == pytest.approx(b, rel=1e-6) if isinstance(b, float) else a == b  # noqa: E731  f32 eps
    differ = {f: (getattr(got, f), getattr(want, f)) for f in want.__dataclass_fields__
              if f not in skip and not same(getattr(got, f), getattr(want, f))}
    assert differ == ({"norm_topk_prob": (False, True)} if fixture == "qwen2_moe_norm" else {})
    assert got.rope_interleave == (fixture == "mixtral")   # the converter permutes Mixtral's q/k rows


def test_qwen2_moe_norm_topk_prob_is_not_in_the_file():
    """The converter writes a Qwen2-MoE with norm_topk_prob true as it writes one with false (the same
    tensors and metadata but the name): no loader can tell them apart. hetero_rt takes llama.cpp's
    qwen2moe semantics (no renormalisation; every released Qwen2-MoE has false), so the file gives the
    false model's logits, 0.108 (measured) off transformers' true model."""
    with GGUFCheckpoint(FIXTURES / "qwen2_moe-f32.gguf") as a, GGUFCheckpoint(FIXTURES / NORM) as b:
        assert a.names() == b.names() and all(np.array_equal(a.raw(n), b.raw(n)) for n in a.names())
        assert {k: v for k, v in a.meta.items() if k != "general.name"} == \
               {k: v for k, v in b.meta.items() if k != "general.name"}
    got = hetero_rt.load(FIXTURES / NORM, context=64).logits(IDS)
    assert rel_err(got, reference("qwen2_moe-f32.gguf")) <= 1e-5
    assert rel_err(got, reference(NORM)) > 0.05


def test_mixtral_router_written_as_ffn_gate_is_refused_by_name():
    """llama.cpp 0.3.16's gguf-py maps block_sparse_moe.gate to ffn_gate (its SmallThinker entry wins over
    ffn_gate_inp): the converter's Mixtral file, as it writes it, has no router under llama.cpp's name."""
    path = FIXTURES / "mixtral_router_as_ffn_gate-f32.gguf"
    with pytest.raises(CheckpointError, match=r"layer 0 has routed experts and 'blk\.0\.ffn_gate\.weight' but no "
                                              r"router 'blk\.0\.ffn_gate_inp\.weight'.*convert the HF checkpoint "
                                              r"again") as e:
        hetero_rt.load(path)
    assert str(e.value).startswith(str(path))


def test_mixtral_with_one_tensor_per_expert_is_refused_by_name(tmp_path):
    """Mixtral GGUFs of early 2024 store each expert as its own tensor (blk.N.ffn_gate.E.weight)."""
    import gguf
    path = tmp_path / "mixtral-per-expert.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_expert_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    for e in range(2):
        for proj in ("gate", "down", "up"):
            w.add_tensor(f"blk.0.ffn_{proj}.{e}.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"mixtral-per-expert.gguf: tensor 'blk\.0\.ffn_gate\.0\.weight' is one "
                                              r"expert's weight.*stacked in blk\.0\.ffn_gate_exps\.weight"):
        hetero_rt.load(path)


# ---- llama.cpp on the same files ---------------------------------------------------------------------------
# measured with llama-cpp-python 0.3.36, n_threads=2 (2-core Xeon): relative to ours (fp32 activations)
LLAMA_CPP_MEASURED = {"qwen3_moe-f32.gguf": 3.5e-4, "qwen2_moe-f32.gguf": 2.2e-4, "mixtral-f32.gguf": 5.0e-4,
                      "glm4_moe-f32.gguf": 2.5e-4, "qwen3_moe-q8_0.gguf": 1.18e-2, "qwen2_moe-q8_0.gguf": 1.06e-2}


def llama_cpp_logits(name: str) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(FIXTURES / name), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(IDS)
    return np.array(llm.scores[:len(IDS)], dtype=np.float32)


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_MEASURED))
def test_llama_cpp_agrees_on_the_converters_files(name, tmp_path):
    """llama.cpp keeps K/V in f16 and, on Q8_0 weights, quantizes activations to q8_0: the bounds are
    about twice what was measured."""
    theirs = llama_cpp_logits(name)
    ours = load(name, "exact", tmp_path).logits(IDS)
    assert rel_err(theirs, ours) <= 2 * LLAMA_CPP_MEASURED[name], rel_err(theirs, ours)


def test_llama_cpp_qwen2moe_never_renormalises():
    """The 0.076 of issue 16: llama.cpp's qwen2moe graph takes the softmax top-k weights as they are. On
    the norm_topk_prob false model it agrees with transformers to 2.2e-4; the converter's file of the
    true model (the same file) gives the same logits, 0.108 off transformers' true model (measured)."""
    theirs = llama_cpp_logits(NORM)
    assert rel_err(theirs, reference("qwen2_moe-f32.gguf")) <= 5e-4
    assert 0.05 < rel_err(theirs, reference(NORM)) < 0.2


@pytest.mark.parametrize("name", ["qwen3_moe-f32.gguf", "mixtral-f32.gguf", "glm4_moe-f32.gguf"])
def test_the_converters_vocabulary_encodes_as_llama_cpp_does(name):
    """tokenizer.ggml.* as the converter writes it (GLM's with its added special tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(FIXTURES / name), vocab_only=True, verbose=False)
    ours = hetero_rt.load(FIXTURES / name, context=64).tokenizer
    for text in ("The quick brown fox jumps over the lazy dog, 12345 times!", "  two  spaces\nand a line"):
        assert ours.encode(text, add_bos=False) == llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.decode(ours.encode(text, add_bos=False)) == text

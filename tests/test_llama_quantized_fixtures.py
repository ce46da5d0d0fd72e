"""GGUFs quantized by llama.cpp itself (committed fixtures, tests/fixtures/make_llama_quantized.py)
against their exact reference: transformers holding the file's weights dequantized by gguf.quants.
These run in every test run, llama-cpp-python installed or not. llama.cpp's quantizers write what
ours do not, notably negative Q6_K sub-block scales."""
from pathlib import Path

import numpy as np
import pytest

import hetero_rt
from hetero_rt.checkpoint.gguf import GGUFCheckpoint

FIXTURES = Path(__file__).parent / "fixtures"
EXACT = FIXTURES / "gguf-cpu-exact.yaml"        # in place, fp32 activations
IDS = list(range(1, 17))
EXPERT_TYPES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q6_K": {"Q6_K"}, "Q2_K": {"Q2_K", "Q3_K", "Q4_K"},
                "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K"}}
Q6_K_BLOCK, Q6_K_SCALES = 210, slice(192, 208)   # ql[128] qh[64] scales[16] (int8) d (fp16)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", sorted(EXPERT_TYPES))
def test_llama_cpp_quantized_fixture_equals_its_dequantized_reference(name):
    path = FIXTURES / "llama_quantized" / f"{name}.gguf"
    want = np.load(FIXTURES / "llama_quantized" / f"{name}.logits.npy")
    with GGUFCheckpoint(path) as ck:
        types = {ck.info(n).type for n in ck.names() if n.endswith("_exps.weight")}
    assert types and types <= EXPERT_TYPES[name], types
    for rules in (EXACT, None):                      # exact in place; the default (int8 activations)
        got = hetero_rt.load(path, rules, context=32).logits(IDS)
        assert got.shape == want.shape
        # measured: 6.5e-7 to 7.4e-7 exact, 4.4e-3 to 4.9e-3 with int8 activations (2-core Xeon)
        assert rel_err(got, want) <= (1e-5 if rules else 2e-2), (rules, rel_err(got, want))


def test_the_q6_k_fixture_has_negative_sub_block_scales():
    """The sign of Q6_K's int8 scales is exercised: llama.cpp writes negative ones (our quantizer does not)."""
    with GGUFCheckpoint(FIXTURES / "llama_quantized" / "Q6_K.gguf") as ck:
        q6 = [n for n in ck.names() if ck.info(n).type == "Q6_K"]
        scales = np.concatenate([ck.raw(n).reshape(-1, Q6_K_BLOCK)[:, Q6_K_SCALES].view(np.int8).ravel() for n in q6])
    assert q6 and (scales < 0).mean() > 0.05

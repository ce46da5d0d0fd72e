"""GGUF weights are read in place (issue 18, item 5; not slow): the routed experts and stored-format
projections of the default placement are views of the file's memory map at their tensor's own offset,
and loading a GGUF with 90 MiB more of experts allocates almost nothing more (anonymous RSS; expanded
to float32 they would take 3.8x their bytes) and grows peak RSS by at most their pages once."""
from pathlib import Path

import numpy as np

import hetero_rt
from hetero_rt.bench.rss import anon_growth
from hetero_rt.bench.synthetic_gguf import lazy_tensors
from hetero_rt.checkpoint.gguf import GGUFCheckpoint
from hetero_rt.checkpoint.gguf_write import write_gguf
from hetero_rt.config import ModelArgs
from hetero_rt.kernels.stored import StoredWeight

Q4_K_M = Path(__file__).parent / "fixtures" / "llama_quantized" / "Q4_K_M.gguf"
EXPERTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def file_offset(a: np.ndarray, path: Path) -> int:
    """The byte offset in `path` at which array `a` starts, if `a` is a view of a memory map of it."""
    base = a                  # views of a memmap are memmaps too: the root is the one over the mmap
    while isinstance(base.base, np.ndarray):
        base = base.base
    assert isinstance(base, np.memmap), "not a view of a memory map"
    assert Path(base.filename) == path.resolve()
    return base.offset + (a.ctypes.data - base.ctypes.data)


def test_default_placement_keeps_gguf_weights_in_the_memory_map():
    rt = hetero_rt.load(Q4_K_M, context=32)
    with GGUFCheckpoint(Q4_K_M) as ck:
        layers = [i for i, b in enumerate(rt.model.layers) if hasattr(b.ffn, "experts")]
        assert layers
        for i in layers:
            experts = rt.model.layers[i].ffn.experts
            for attr, gguf_name in EXPERTS.items():
                w, info = getattr(experts, attr), ck.info(f"blk.{i}.{gguf_name}.weight")
                assert not w.flags.writeable and w.nbytes == info.nbytes
                assert file_offset(w, Q4_K_M) == info.offset, (i, attr)
        stored = [p.stored for p in rt.model.parameters() if isinstance(getattr(p, "stored", None), StoredWeight)]
        offsets = {ck.info(n).offset for n in ck.names()}
        assert len(stored) > 5 and all(file_offset(w.raw, Q4_K_M) in offsets for w in stored)


def _q8_file(path: Path, layers: int) -> Path:
    cfg = dict(model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=512,
               moe_intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4, q_lora_rank=128,
               kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=64,
               num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, moe_layer_freq=1,
               scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
               routed_scaling_factor=2.5, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    write_gguf(path, cfg, lazy_tensors(ModelArgs.from_dict(cfg), seed=0), types="Q8_0")
    return path


def test_more_experts_in_a_gguf_add_little_resident_memory(tmp_path):
    small, big = _q8_file(tmp_path / "small.gguf", 2), _q8_file(tmp_path / "big.gguf", 9)
    grown = big.stat().st_size - small.stat().st_size
    assert 64 << 20 <= grown <= 128 << 20
    peak, anon, report = anon_growth(small, big)
    assert peak <= 1.1, report                  # the file's pages at most once
    assert anon <= 0.15, report                 # allocated: none per expert byte (float32 copies: 3.8)

"""The routed-experts seam and its one build path (hetero_rt.experts): the registry is the only list of
backends (schema, plan and planner follow it, a backend added there is accepted everywhere), both
loaders hand the builder the same ExpertWeights (GGUF experts as views of the memory map where the
backend runs their format), each layer is built once as the plan says and nothing is attached to the
model, every backend returns routed + shared against the torch reference, and the runtime path never
imports the bench package."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

import hetero_rt
from gguf_models import KQUANT_DIMS, make_gguf
from hetero_rt.api import make_plan
from hetero_rt.checkpoint.source import DirectorySource, GGUFSource, default_dtype, open_source
from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from hetero_rt.errors import CheckpointError, HeteroRTError
from hetero_rt.experts import ExpertsBuilder, ExpertWeights, NumbaExperts, TorchExperts, registry
from hetero_rt.experts.hetero import HeteroExperts, hetero_session
from hetero_rt.model.layers import MLP
from hetero_rt.placement.plan import resolve
from hetero_rt.placement.schema import HeteroSpec, PlacementError, parse_rules

CFG = dict(num_hidden_layers=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("seam") / "ckpt", synthetic_config("tiny", **CFG),
                                      seed=5, dtype="float32", tokenizer=False)


def rules(tmp_path, backend: str, extra: str = "") -> str:
    path = tmp_path / f"{backend}.yaml"
    path.write_text("defaults: {device: cpu, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
                    f"    place: {{backend: {backend}{extra}}}\n")
    return str(path)


def test_schema_and_plan_take_their_backends_from_the_registry(monkeypatch, ckpt):
    args = open_source(ckpt).args()
    text = "defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n    place: {backend: fake}\n"
    with pytest.raises(PlacementError, match=r"<r>:4: unknown backend 'fake'; expected one of hetero, numba, torch"):
        parse_rules(text, "<r>")
    fake = dataclasses.replace(registry.BACKENDS["numba"], name="fake", options=())
    monkeypatch.setitem(registry.BACKENDS, "fake", fake)
    plan = resolve(args, parse_rules(text, "<r>"))
    assert {plan.experts(i).backend for i in range(1, CFG["num_hidden_layers"])} == {"fake"}
    with pytest.raises(PlacementError, match="activations 'int8' is a setting of the numba kernels"):
        resolve(args, parse_rules(text.replace("backend: fake", "backend: fake, activations: int8"), "<r>"))
    cuda = text.replace("place: {backend: fake}", "place: {device: cuda, backend: fake}")
    with pytest.raises(PlacementError, match="backend 'fake' runs on the CPU"):
        parse_rules(cuda, "<r>")


def test_registry_declares_each_backend_once():
    assert registry.names() == ("torch", "numba", "hetero")
    assert registry.DEFAULT in registry.names() and registry.CPU_DEFAULT in registry.names()
    assert registry.cpu_only() == ("numba", "hetero") and registry.with_option("hetero") == ("hetero",)
    with pytest.raises(HeteroRTError, match="unknown routed-experts backend 'x'"):
        registry.get("x")


@pytest.mark.parametrize("backend,cls", [("torch", TorchExperts), ("numba", NumbaExperts), ("hetero", HeteroExperts)])
def test_each_layer_is_built_once_as_the_plan_says(ckpt, tmp_path, backend, cls):
    rt = hetero_rt.load(ckpt, rules(tmp_path, backend), context=32)
    moe = [b.ffn for b in rt.model.layers if hasattr(b.ffn, "experts")]
    assert len(moe) == CFG["num_hidden_layers"] - 1 and all(type(m.experts) is cls for m in moe)
    assert not hasattr(rt.model, "hetero")
    session = hetero_session(rt.model)
    if backend != "hetero":
        assert session is None
        return
    assert all(m.experts.session is session for m in moe)            # one session for the model
    for cur, nxt in zip(moe, moe[1:]):                               # linked as the model was built
        assert cur.experts.next[0] is nxt.gate and cur.experts.next[1] is nxt.experts
    assert moe[-1].experts.next == ()
    session.close()


def test_builder_refuses_a_second_build_and_a_missing_layer(ckpt):
    source = open_source(ckpt)
    args = source.args()
    plan = make_plan(args, None, None, False)
    loader = source.loader(args)
    builder = ExpertsBuilder(args, "cpu", torch.float32)
    w = loader.expert_weights(1, registry.get("torch"), torch.float32)
    builder.build(w, plan.experts(1))
    with pytest.raises(HeteroRTError, match="layer 1: routed experts built twice"):
        builder.build(w, plan.experts(1))
    with pytest.raises(HeteroRTError, match="layer 2: no routed experts were built"):
        builder.experts_for(2, None)


@pytest.mark.parametrize("backend,want", [("torch", torch.bfloat16), ("numba", torch.float32)])
def test_safetensors_loader_hands_stacked_tensors(ckpt, backend, want):
    """In the placement dtype for the torch backend; as stored (this checkpoint: fp32) for a backend
    whose kernels read the format as stored, as the GGUF loader does."""
    source = open_source(ckpt)
    args = source.args()
    w = source.loader(args).expert_weights(2, registry.get(backend), torch.bfloat16)
    e, i, d = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
    fmt = {torch.bfloat16: "bf16", torch.float32: "fp32"}[want]
    assert isinstance(w, ExpertWeights) and w.is_dense and (w.fmt13, w.fmt2) == (fmt, fmt)
    assert w.shape == (e, i, d) and tuple(w.w2.shape) == (e, d, i) and w.w1.dtype == want
    expert3 = source.ckpt.load("model.layers.2.mlp.experts.3.down_proj.weight", (d, i), want)
    assert torch.equal(w.w2[3], expert3)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_gguf_loader_keeps_stored_experts_in_the_map_for_backends_that_run_them(tmp_path, backend):
    _, path, _ = make_gguf("v3", tmp_path, "Q8_0", **KQUANT_DIMS)
    source = open_source(path)
    args = source.args()
    w = source.loader(args).expert_weights(1, registry.get(backend), torch.float32)
    raw = source.ckpt.raw("blk.1.ffn_gate_exps.weight")
    if backend == "numba":
        assert (w.fmt13, w.fmt2) == ("q8_0", "q8_0") and w.w1.dtype == np.uint8
        assert np.shares_memory(w.w1, raw)                           # a view of the memory map, no copy
    else:
        assert w.is_dense and w.w1.dtype == torch.float32
        ref = source.ckpt.dequantize("blk.1.ffn_gate_exps.weight")
        assert np.array_equal(w.w1.numpy(), ref)


def test_every_backend_returns_routed_plus_shared(ckpt):
    """The seam's contract on one layer's weights: each backend == the torch reference + shared(x)."""
    source = open_source(ckpt)
    args = source.args()
    w = source.loader(args).expert_weights(1, registry.get("numba"), torch.float32)
    plan = make_plan(args, None, None, False)
    ref = TorchExperts.from_weights(w.w1, w.w3, w.w2)
    shared = MLP(args.hidden_size, 16)
    for p in shared.parameters():
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, args.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(args.n_routed_experts, generator=g)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=g)
    want = ref(x, ids, weights) + shared(x)
    builder = ExpertsBuilder(args, "cpu", torch.float32)
    for name in registry.names():
        hetero = HeteroSpec(cache_slots=2, prefetch=False) if "hetero" in registry.get(name).options else None
        module = registry.get(name).build(w, dataclasses.replace(plan.experts(1), backend=name, hetero=hetero), builder)
        for _ in range(2):                                           # hetero: promotions after the first call
            torch.testing.assert_close(module(x, ids, weights, shared), want, atol=1e-4, rtol=1e-4)
    builder.hetero_session().close()


def test_source_tells_gguf_from_directory(ckpt, tmp_path):
    assert isinstance(open_source(ckpt), DirectorySource)
    _, path, _ = make_gguf("v3", tmp_path, "F32")
    gguf = open_source(path)
    assert isinstance(gguf, GGUFSource) and gguf.embedding_dtype() == "float32"
    assert open_source(ckpt).embedding_dtype() == "float32"
    assert default_dtype({"model.embed_tokens.weight": ("BF16", (4, 4))}) == "bfloat16" == default_dtype({})
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_source(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="expected a Hugging Face checkpoint directory"):
        open_source(ckpt / "config.json")


def test_the_runtime_path_never_imports_the_bench_package():
    code = ("import sys, hetero_rt, hetero_rt.cli, hetero_rt.experts.hetero; "
            "bad = sorted(m for m in sys.modules if m.startswith('hetero_rt.bench')); print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

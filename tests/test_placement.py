"""Placement rules: validation errors with line numbers, precedence, CPU fallback, and the
memory planner against hand-computed sizes (real DeepSeek-V3 shapes) and loaded tensor bytes."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import hetero_rt
from hetero_rt.config import ModelArgs
from hetero_rt.checkpoint.source import read_tensor_meta
from hetero_rt.placement.memory import plan_memory
from hetero_rt.placement.sizes import fmt_bytes, parse_bytes
from hetero_rt.placement.plan import resolve
from hetero_rt.placement.schema import PlacementError, load_rules, parse_rules
from hetero_rt.placement.write import write_rules
from fp8_models import fp8_dequantize, fp8_quantize
from hf_models import build_hf_model, hf_logits, save_hf_model

FIXTURES = Path(__file__).parent / "fixtures"
V3 = FIXTURES / "deepseek_v3"
ROOT = Path(__file__).parent.parent
IDS = [4, 8, 15, 16, 23, 42, 7, 1]


@pytest.fixture(scope="module")
def v3_args():
    return ModelArgs.from_config_file(V3 / "config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_hf_model("v3", seed=5)
    return hf, save_hf_model(hf, "v3", tmp_path_factory.mktemp("tiny"))


def rules_error(text: str, args: ModelArgs, **kw) -> str:
    with pytest.raises(PlacementError) as e:
        resolve(args, parse_rules(text, "r.yaml"), **kw)
    return str(e.value)


GOOD = "defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n    place: {device: cpu, backend: torch}\n"


@pytest.mark.parametrize("text,needle", [
    ("rules:\n  - match: {kind: gate}\n    place: {devic: cpu}\n", "r.yaml:3: unknown key 'devic' in place"),
    ("rules:\n  - match: {kind: gate}\n    place: {device: tpu}\n", "r.yaml:3: unknown device 'tpu'"),
    ("rules:\n  - match: {kind: routed_experts}\n    place: {backend: onnx}\n", "r.yaml:3: unknown backend 'onnx'"),
    ("rules:\n  - match: {kind: experts}\n    place: {device: cpu}\n", "r.yaml:2: unknown kind 'experts'"),
    ("rules:\n  - match: {name: 'model.layers.(3'}\n    place: {device: cpu}\n", "r.yaml:2: invalid regex"),
    ("rules:\n  - match: {kind: gate}\n    place: {backend: numba}\n", "r.yaml:3: backend 'numba' cannot run kind 'gate'"),
    ("rules:\n  - match: {kind: routed_experts}\n    place: {device: cuda, backend: numba}\n",
     "r.yaml:3: backend 'numba' runs on the CPU"),
    ("rules:\n  - match: {kind: gate}\n    place: {threads: 0}\n", "r.yaml:3: threads must be a positive integer"),
    ("rules:\n  - match: {kind: gate}\n    place: {dtype: int4}\n", "r.yaml:3: unknown dtype 'int4'"),
    ("rules:\n  - match: {kind: routed_experts}\n    place: {activations: int4}\n",
     "r.yaml:3: unknown activations 'int4'; expected one of fp32, int8"),
    ("rules:\n  - match: {kind: gate}\n    place: {activations: int8}\n",
     "r.yaml:3: activations is a setting of the CPU kernels (routed_experts on numba/hetero, format: stored"),
    ("defaults: {device: cpu}\nrule:\n  - {}\n", "r.yaml:2: unknown key 'rule' in the placement file"),
    ("rules:\n  - match: {}\n    place: {device: cpu}\n", "r.yaml:2: match is empty"),
    ("rules:\n  - place: {device: cpu}\n", "r.yaml:2: rule has no 'match:'"),
    ("rules: [\n", "r.yaml:2: not valid YAML"),
    ("", "r.yaml: empty placement file"),
])
def test_schema_errors(text, needle, v3_args):
    assert needle in rules_error(text, v3_args)


def test_resolution_errors(v3_args):
    assert "r.yaml:5: rule matches no module of this model" in rules_error(
        GOOD + "  - match: {name: 'model\\.layers\\.99\\..*'}\n    place: {device: cpu}\n", v3_args)
    assert "no rule places module model.embed_tokens (kind embedding)" in rules_error(
        "rules:\n  - match: {kind: routed_experts}\n    place: {device: cpu}\n", v3_args)
    msg = rules_error(GOOD + "  - match: {name: 'model\\.layers\\.3\\.mlp\\.gate'}\n    place: {backend: torch}\n",
                      v3_args)
    assert "r.yaml:5: backend cannot be set for model.layers.3.mlp.gate (kind gate)" in msg
    msg = rules_error(GOOD + "  - match: {kind: routed_experts}\n    place: {activations: int8}\n", v3_args)
    assert "activations 'int8' is a setting of the numba kernels (backend numba or hetero); the rules give " \
           "backend 'torch'" in msg
    msg = rules_error(GOOD + "  - match: {name: 'model\\.layers\\.3\\.self_attn'}\n    place: {activations: int8}\n",
                      v3_args)
    assert "r.yaml:5: model.layers.3.self_attn: activations 'int8' is a setting of the CPU kernels, which run attention only with format: stored" in msg
    msg = rules_error(GOOD + "  - match: {kind: attention}\n    place: {device: cuda}\n", v3_args,
                      check_devices=False)
    assert "every module except routed_experts runs on one device" in msg


def test_precedence_is_last_match_field_by_field(v3_args):
    text = ("defaults: {device: cuda, dtype: bfloat16}\nrules:\n"
            "  - match: {kind: routed_experts}\n    place: {device: cpu, backend: numba, threads: 8}\n"
            "  - match: {name: 'model\\.layers\\.(5|6)\\.mlp\\.experts'}\n    place: {threads: 2}\n"
            "  - match: {name: 'model\\.layers\\.6\\.mlp\\.experts'}\n    place: {device: cuda, backend: torch}\n")
    plan = resolve(v3_args, parse_rules(text, "p.yaml"), check_devices=False)
    p4, p5, p6 = plan.experts(4), plan.experts(5), plan.experts(6)
    assert (p4.device, p4.backend, p4.threads) == ("cpu", "numba", 8)
    assert (p5.device, p5.backend, p5.threads, p5.lines) == ("cpu", "numba", 2, (1, 3, 5))
    assert (p6.device, p6.backend, p6.threads) == ("cuda", "torch", 2)
    assert plan.main.device == "cuda" and plan.main.dtype == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_needs_cpu_fallback(tiny, tmp_path, capsys):
    hf, path = tiny
    rules = tmp_path / "gpu.yaml"
    rules.write_text("defaults: {device: cuda}\nrules:\n  - match: {kind: routed_experts}\n    place: {device: cpu}\n")
    with pytest.raises(PlacementError, match="no such CUDA device is available; run with --cpu-fallback"):
        hetero_rt.load(path, rules)
    rt = hetero_rt.load(path, rules, cpu_fallback=True, dtype="float32")
    err = capsys.readouterr().err
    assert err.count("cpu_fallback") == 1
    assert rt.plan.cpu_fallback and set(rt.plan.written_devices) == {"cuda", "cpu"}
    assert "cuda -> cpu" in rt.plan.describe()
    ref = hf_logits(hf, IDS).numpy()
    assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_planner_bytes_equal_loaded_bytes(tiny):
    _, path = tiny
    rt = hetero_rt.load(path, dtype="float32")
    loaded = {}
    for name, p in rt.model.named_parameters():
        kind = kind_of(name)
        loaded[kind] = loaded.get(kind, 0) + p.numel() * p.element_size()
    mem = plan_memory(rt.args, rt.plan, read_tensor_meta(path), 64, "float32")
    assert mem.devices["cpu"].weights == loaded
    assert mem.devices["cpu"].kv_cache == rt.args.num_hidden_layers * 64 * (32 + 8) * 4


def kind_of(name: str) -> str:
    rules = [(r"^embed\.", "embedding"), (r"^head$", "lm_head"), (r"norm\.weight$", "norm"),
             (r"\.attn\.", "attention"), (r"\.ffn\.gate\.", "gate"), (r"\.ffn\.experts\.", "routed_experts"),
             (r"\.ffn\.shared_experts\.", "shared_experts"), (r"\.ffn\.w[123]$", "dense_mlp")]
    if name.endswith("q_norm.weight") or name.endswith("kv_norm.weight"):
        return "attention"
    return next(kind for pattern, kind in rules if re.search(pattern, name))


def test_planner_deepseek_v3_hand_computed(v3_args):
    D, V, L, MOE, E, I = 7168, 129280, 61, 58, 256, 2048
    rules = parse_rules("defaults: {device: cuda, dtype: bfloat16}\nrules:\n"
                        "  - match: {kind: routed_experts}\n    place: {device: cpu}\n", "v3.yaml")
    plan = resolve(v3_args, rules, check_devices=False)
    mem = plan_memory(v3_args, plan, read_tensor_meta(V3), 4096, "bfloat16",
                      {"cuda": parse_bytes("24GiB"), "cpu": parse_bytes("2TiB")})
    gpu, cpu = mem.devices["cuda"].weights, mem.devices["cpu"].weights
    attention = (1536 * D + 1536 + 128 * 192 * 1536 + 576 * D + 512 + 128 * 256 * 512 + D * 128 * 128) * 2
    assert gpu["attention"] == L * attention
    assert gpu["embedding"] == gpu["lm_head"] == V * D * 2
    assert gpu["norm"] == (2 * L + 1) * D * 2
    assert gpu["dense_mlp"] == 3 * 3 * 18432 * D * 2
    assert gpu["gate"] == MOE * (E * D * 2 + E * 4)              # bias stays fp32
    assert gpu["shared_experts"] == MOE * 3 * I * D * 2
    assert cpu["routed_experts"] == MOE * E * 3 * I * D * 2 == 1_307_817_541_632
    assert mem.devices["cuda"].kv_cache == L * 4096 * 576 * 2
    assert mem.over()["cuda"] > 0 and "DOES NOT FIT" in mem.verdict()


def test_write_rules_fits_the_budget(v3_args):
    tensors = read_tensor_meta(V3)
    text = write_rules(v3_args, tensors, parse_bytes("80GiB"), 4096, "bfloat16")
    plan = resolve(v3_args, parse_rules(text, "w.yaml"), check_devices=False)
    mem = plan_memory(v3_args, plan, tensors, 4096, "bfloat16", {"cuda": parse_bytes("80GiB")})
    assert not mem.over()
    on_gpu = [p.module.layer for p in plan.placements if p.module.kind == "routed_experts" and p.device == "cuda"]
    per_layer = 256 * 3 * 2048 * 7168 * 2                # an expert layer on the GPU, bf16 (torch backend)
    assert len(on_gpu) >= 1 and mem.devices["cuda"].total + per_layer > parse_bytes("80GiB")
    with pytest.raises(hetero_rt.HeteroRTError, match="even with every routed expert on the CPU"):
        write_rules(v3_args, tensors, parse_bytes("16GiB"), 4096, "bfloat16")


def _as_gguf_q4_k_m(tensors):
    """The V3 metadata with the types of a llama.cpp Q4_K_M file (Q4_K; Q6_K for lm_head and every
    other layer's expert down projections; norms F32; no FP8 scales)."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if len(shape) == 1 or "e_score_correction_bias" in name or ".mlp.gate.weight" in name:
            out[name] = ("F32", shape)
        elif name == "lm_head.weight" or (layer and int(layer.group(1)) % 2 == 0 and "down_proj" in name):
            out[name] = ("Q6_K", shape)
        else:
            out[name] = ("Q4_K", shape)
    return out


@pytest.mark.parametrize("kind,host", [("fp8", "768GiB"), ("q4_k_m", "512GiB")])
def test_write_rules_fits_deepseek_v3_on_24gb_plus_host_ram(v3_args, kind, host):
    """DeepSeek-V3 as released (block FP8) plans into 24 GB + 768 GB, and as a Q4_K_M GGUF into
    24 GB + 512 GB: routed experts on the CPU at their stored size, the dense part on the GPU in
    block FP8 (as stored; quantized at load from Q4_K_M, which the rules' header says)."""
    tensors = read_tensor_meta(V3) if kind == "fp8" else _as_gguf_q4_k_m(read_tensor_meta(V3))
    text = write_rules(v3_args, tensors, parse_bytes("24GiB"), 4096, "bfloat16")
    assert "format: float8_e4m3" in text and (("quantized to" in text) == (kind == "q4_k_m"))
    plan = resolve(v3_args, parse_rules(text, "w.yaml"), check_devices=False)
    mem = plan_memory(v3_args, plan, tensors, 4096, "bfloat16", {"cuda": parse_bytes("24GiB"), "cpu": parse_bytes(host)})
    assert not mem.over(), mem.describe()
    experts = mem.devices["cpu"].weights["routed_experts"]
    mtp = f"model.layers.{v3_args.num_hidden_layers}."                          # not loaded
    stored = sum(np.prod(s) for n, (d, s) in tensors.items()
                 if ".mlp.experts." in n and not n.startswith(mtp) and not n.endswith("_scale_inv"))  # values
    per_value = 132 / 128 if kind == "fp8" else 4.5 / 8                            # bytes as stored
    assert stored * per_value * 0.99 <= experts <= stored * per_value * 1.1


def test_plan_cli_answers_from_metadata(capsys, tmp_path):
    from hetero_rt.cli import main
    rc = main(["plan", "--model", str(V3), "--gpu-mem", "80GiB", "--host-mem", "2TiB",
               "--write-rules", str(tmp_path / "out.yaml")])
    out = capsys.readouterr().out
    assert rc == 0 and "verdict: fits" in out and "routed_experts" in out
    load_rules(tmp_path / "out.yaml")
    assert main(["plan", "--model", str(V3), "--rules", str(tmp_path / "out.yaml"), "--gpu-mem", "40GiB",
                 "--host-mem", "2TiB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_plan_budgets_default_to_this_machine(capsys, monkeypatch):
    """Without --host-mem the CPU budget is this machine's RAM (forced here to 64 GiB) and plan says so;
    a GPU the machine lacks gets no budget, with a line saying so; given budgets are used as given."""
    import psutil
    from hetero_rt.cli import main
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"total": 64 << 30})())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rules = str(ROOT / "placement_rules" / "deepseek-v3-24gb.yaml")
    assert main(["plan", "--model", str(V3), "--rules", rules]) == 1
    out = capsys.readouterr().out
    assert "assumed: cpu budget = this machine's RAM, 64.00 GiB" in out
    assert "no budget for cuda: this machine has no such GPU" in out and "cpu is short by" in out
    assert main(["plan", "--model", str(V3), "--rules", rules, "--host-mem", "2TiB", "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "assumed" not in out and "no budget" not in out and "verdict: fits" in out


@pytest.mark.parametrize("flag", ["--gpu-mem", "--host-mem"])
def test_plan_refuses_a_budget_without_a_unit(flag, capsys):
    from hetero_rt.cli import main
    assert main(["plan", "--model", str(V3), flag, "24"]) == 2
    assert f"{flag}: '24' has no unit; write e.g. 24GiB or 24GB" in capsys.readouterr().err


def test_sizes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30 and parse_bytes("1.5 GB") == 1_500_000_000
    assert fmt_bytes(3 * 2 ** 30) == "3.00 GiB"
    with pytest.raises(hetero_rt.HeteroRTError, match="cannot read '24 parsecs'"):
        parse_bytes("24 parsecs")


SHIPPED = sorted((Path(__file__).parent.parent / "placement_rules").glob("*.yaml"))
REAL_CONFIGS = {"deepseek-v3": V3 / "config.json", "deepseek-v2-lite": FIXTURES / "deepseek_v2_lite_config.json",
                "kimi-k2": FIXTURES / "kimi_k2_config.json",
                "qwen3-30b-a3b": FIXTURES / "qwen3_30b_a3b" / "config.json",
                "qwen3-235b-a22b": FIXTURES / "qwen3_235b_a22b" / "config.json",
                "mixtral-8x7b": FIXTURES / "mixtral_8x7b" / "config.json",
                "glm-4.5-air": FIXTURES / "glm_4_5_air" / "config.json"}
# the grouped-query families' files name their own models' layers (tests/test_family_rules.py)
FAMILY_PREFIXES = ("qwen3-", "mixtral-", "glm-")
DEEPSEEK_SHIPPED = [p for p in SHIPPED if not p.name.startswith(FAMILY_PREFIXES)]


def test_every_shipped_file_has_a_header_and_fits_its_model(tmp_path):
    assert {p.name for p in SHIPPED} >= {"cpu-only.yaml", "all-gpu.yaml", "deepseek-v2-lite-8gb.yaml",
                                         "kimi-k2-24gb.yaml", "deepseek-v3-24gb.yaml"}
    for path in SHIPPED:
        assert path.read_text().startswith(f"# {path.name} — "), path
        model = next((m for m in REAL_CONFIGS if path.name.startswith(m)), None)
        if model is None:
            continue
        args = ModelArgs.from_config_file(REAL_CONFIGS[model])
        gpu = parse_bytes(re.search(r"-(\d+)gb\.yaml$", path.name).group(1) + "GiB")
        plan = resolve(args, load_rules(path), check_devices=False)
        meta = read_tensor_meta(REAL_CONFIGS[model].parent if model == "deepseek-v3" else tmp_path, args)
        mem = plan_memory(args, plan, meta, 2048, "bfloat16", {"cuda": gpu})
        assert not mem.over(), (path.name, mem.describe())


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    """A 5-layer DeepSeek-V3-style FP8 checkpoint (as released): every shipped file but the other
    families' applies to it."""
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    cfg = synthetic_config("tiny", num_hidden_layers=5, hidden_size=256, moe_intermediate_size=128,
                           intermediate_size=384)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("five") / "ckpt", cfg, seed=6, dtype="fp8")


@pytest.mark.parametrize("rules", DEEPSEEK_SHIPPED, ids=lambda p: p.name)
def test_shipped_rules_give_the_default_logits(rules, five_layers, tmp_path):
    """Placement changes where weights live and how they are stored, never the result: each shipped
    file (with CPU fallback) gives the logits of everything on the CPU in the same dtype, with the
    same expert backend per layer (backends differ in accumulation order, placements must not)."""
    rt = hetero_rt.load(five_layers, rules, dtype="float32", cpu_fallback=True)
    layers = [p.module.layer for p in rt.plan.placements
              if p.module.kind == "routed_experts" and p.backend in ("numba", "hetero")]
    reference = tmp_path / "reference.yaml"
    reference.write_text("defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n"
                         "    place: {backend: torch}\n" + (
                             f"  - match: {{name: 'model\\.layers\\.({'|'.join(map(str, layers))})\\.mlp\\.experts'}}\n"
                             "    place: {backend: numba}\n" if layers else ""))
    default = hetero_rt.load(five_layers, reference, dtype=rt.dtype).logits(IDS)
    got = rt.logits(IDS)
    # hetero: experts in the GPU cache compute in the run dtype (bf16 here), numba in fp32, so results
    # differ by bf16 rounding (fp32 runs are identical: tests/test_scheduler.py)
    cached = any(p.hetero is not None and p.hetero.slots(1, 1) for p in rt.plan.placements)
    tol = 2 ** -6 if cached and rt.dtype != torch.float32 else 1e-5
    assert np.abs(got - default).max() <= tol * np.abs(default).max()


FP8_RULES = ("defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n    place: {device: cpu}\n"
             "  - match: {kind: attention}\n    place: {format: float8_e4m3}\n"
             "  - match: {kind: shared_experts}\n    place: {format: float8_e4m3}\n"
             "  - match: {kind: dense_mlp}\n    place: {format: float8_e4m3}\n")


def test_fp8_weight_format_equals_dequantize_at_load(tmp_path):
    """Weights kept in block FP8 and expanded per matmul give the logits of the same FP8 checkpoint
    dequantized once at load; the stored parameters really are FP8."""
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    cfg = synthetic_config("tiny", hidden_size=256, moe_intermediate_size=160, intermediate_size=384)
    ckpt = write_synthetic_checkpoint(tmp_path / "fp8", cfg, seed=4, dtype="fp8")
    (tmp_path / "r.yaml").write_text(FP8_RULES)
    kept = hetero_rt.load(ckpt, tmp_path / "r.yaml", dtype="float32")
    wq = kept.model.layers[1].attn.wq_b
    assert wq.dtype == torch.float8_e4m3fn and wq.scale_inv.shape == (1, 1)
    assert kept.model.layers[0].ffn.w1.dtype == torch.float8_e4m3fn
    assert kept.model.layers[1].ffn.shared_experts.w2.dtype == torch.float8_e4m3fn
    assert kept.model.layers[1].attn.kv_norm.weight.dtype == torch.float32   # 1-D weights stay in dtype
    ref = hetero_rt.load(ckpt, dtype="float32").logits(IDS)
    got = kept.logits(IDS)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(kept.logits(IDS, absorbed=True) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp8_format_quantizes_a_bf16_checkpoint(tiny, tmp_path):
    hf, path = tiny
    (tmp_path / "r.yaml").write_text(FP8_RULES)
    rt = hetero_rt.load(path, tmp_path / "r.yaml", dtype="float32")
    assert rt.model.layers[1].attn.wo.dtype == torch.float8_e4m3fn
    # oracle: the transformers model with exactly those weights (attention, shared experts, the dense
    # layer's MLP) block-quantized and dequantized by the test's own DeepSeek-format FP8 code
    ref_model = build_hf_model("v3", seed=5)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if p.dim() == 2 and (".self_attn." in name or ".shared_experts." in name
                                 or (name.startswith("model.layers.0.mlp.") and ".gate." not in name)):
                p.copy_(fp8_dequantize(*fp8_quantize(p.detach())))
    ref = hf_logits(ref_model, IDS).numpy()
    assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp8_format_planned_bytes(v3_args):
    plan = resolve(v3_args, parse_rules(FP8_RULES.replace("defaults: {device: cpu}", "defaults: {device: cuda}"),
                                        "f.yaml"), check_devices=False)
    mem = plan_memory(v3_args, plan, read_tensor_meta(V3), 4096, "bfloat16")
    D = 7168
    o_proj = D * 16384 + 4 * 56 * 128
    assert mem.devices["cuda"].weights["shared_experts"] == 58 * 3 * (2048 * D + 4 * 16 * 56)
    assert mem.devices["cuda"].weights["attention"] % 61 == 0 and mem.devices["cuda"].weights["attention"] > 61 * o_proj
    with pytest.raises(PlacementError, match="x.yaml:3: format 'float8_e4m3' is available for attention, "
                                             "shared_experts, dense_mlp, not routed_experts"):
        parse_rules("rules:\n  - match: {kind: routed_experts}\n    place: {format: float8_e4m3}\n", "x.yaml")
    # a name-only rule reaching a kind that cannot expand FP8 (the gate) fails at resolve time
    msg = rules_error("defaults: {device: cuda}\nrules:\n  - match: {name: 'model\\.layers\\.3\\.mlp\\.gate'}\n"
                      "    place: {format: float8_e4m3}\n", v3_args, check_devices=False)
    assert "r.yaml:3: model.layers.3.mlp.gate: format 'float8_e4m3' is available for" in msg


def test_numba_backend_from_rules_matches_torch(tiny, tmp_path):
    """`backend: numba` in the rules runs the layer's experts in the numba kernels on the same
    (zero-copy) stacked weights; logits equal the torch backend's."""
    from hetero_rt.experts.numba_backend import NumbaExperts
    _, path = tiny
    rules = tmp_path / "numba.yaml"
    rules.write_text("defaults: {device: cpu}\nrules:\n  - match: {kind: routed_experts}\n"
                     "    place: {device: cpu, backend: numba, threads: 2}\n")
    rt = hetero_rt.load(path, rules, dtype="float32")
    experts = rt.model.layers[1].ffn.experts
    assert isinstance(experts, NumbaExperts) and experts.threads == 2 and experts.act == "fp32"
    ref = hetero_rt.load(path, dtype="float32").logits(IDS)
    assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()
    # `activations: int8` reaches the kernels (fp32 weights ignore it: still exact)
    rules.write_text(rules.read_text() + "  - match: {kind: routed_experts}\n    place: {activations: int8}\n")
    rt = hetero_rt.load(path, rules, dtype="float32")
    assert rt.model.layers[1].ffn.experts.act == "int8"
    assert "activations=int8" in rt.plan.describe()
    assert np.abs(rt.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_readme_example_is_a_valid_placement(v3_args):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    plan = resolve(v3_args, parse_rules(example, "README.md"), check_devices=False)
    assert plan.experts(3).device == "cuda" and plan.experts(5).backend == "numba"


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - match: {kind: routed_experts}\n    place: {backend: hetero, hetero: {decay: .nan}}\n",
     r"r.yaml:3: hetero.decay must be a number in \(0, 1\], found nan"),
    ("rules:\n  - match: {kind: routed_experts}\n    place: {backend: hetero, hetero: {pcie_gbps: .inf}}\n",
     "r.yaml:3: hetero.pcie_gbps must be a positive number"),
    ("rules:\n  - match: {kind: routed_experts}\n    place: {threads: 1000000}\n",
     r"r.yaml:3: threads must be a positive integer \(at most 4096\), found 1000000"),
    ("rules:\n" + "  " * 2 + "[" * 5000 + "]" * 5000 + "\n", "r.yaml: nested too deeply"),
])
def test_absurd_or_hostile_rules_get_a_located_error(text, message):
    with pytest.raises(PlacementError, match=message):
        parse_rules(text, "r.yaml")


def test_rules_file_that_is_not_utf8_or_too_large(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("defaults: {device: cpu}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(PlacementError, match=r"latin1.yaml:2: not UTF-8 text \(byte 29\)"):
        load_rules(bad)
    big = tmp_path / "big.yaml"
    big.write_text("#" * (2 << 20))
    with pytest.raises(PlacementError, match="is not a placement file"):
        load_rules(big)


def test_a_backtracking_name_pattern_is_refused_not_hung(v3_args):
    """(a|a)*-style nesting on a module path backtracks exponentially; matching stops at the timeout."""
    rules = parse_rules("defaults: {device: cpu}\nrules:\n  - match: {name: '(m|[a-z.0-9]|.)*x'}\n"
                        "    place: {device: cpu}\n", "r.yaml")
    with pytest.raises(PlacementError, match=r"r.yaml:3: the name pattern .* backtracked for more than"):
        resolve(v3_args, rules)


def test_shipped_rules_load_by_name_from_any_directory(tmp_path, monkeypatch):
    """--rules gguf-cpu-only (or .yaml, or placement_rules/...) finds the file packaged with hetero_rt,
    wherever the command runs; an unknown name lists the shipped ones."""
    from hetero_rt.placement.schema import SHIPPED_RULES, find_rules, shipped_rules
    monkeypatch.chdir(tmp_path)
    assert "gguf-cpu-only" in shipped_rules() and "deepseek-v3-24gb" in shipped_rules()
    for name in ("gguf-cpu-only", "gguf-cpu-only.yaml", "placement_rules/gguf-cpu-only.yaml"):
        assert find_rules(name) == SHIPPED_RULES / "gguf-cpu-only.yaml"
        assert load_rules(name).rules
    mine = tmp_path / "gguf-cpu-only.yaml"
    mine.write_text("rules: []\n")
    assert find_rules("gguf-cpu-only.yaml") == Path("gguf-cpu-only.yaml")    # a file given by path wins
    with pytest.raises(PlacementError, match="deepseek-v3-24gb"):
        find_rules("no-such-rules")
    with pytest.raises(PlacementError, match="not found"):
        find_rules(tmp_path / "elsewhere" / "gguf-cpu-only.yaml")


def test_shipped_rules_and_web_page_are_package_data():
    """pyproject's package-data ships every placement file and the web chat page with the package (so
    `--rules NAME` and GET / work from a wheel, not only from a checkout)."""
    import fnmatch
    import tomllib
    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hetero_rt"]
    files = [p.relative_to(root / "hetero_rt").as_posix() for p in (root / "hetero_rt").rglob("*")
             if p.suffix in (".yaml", ".html")]
    assert "serve/static/index.html" in files and len([f for f in files if f.endswith(".yaml")]) >= 8
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)

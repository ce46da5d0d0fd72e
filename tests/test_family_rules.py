"""The shipped placement files for the grouped-query families (issue 16): each one resolves against the
config.json of the released model (config-only planning: shapes derived from the config, no weights),
the memory planner says it fits the GPU it is named for and the host RAM its header states, and its
rules are exactly what `hetero-rt plan --write-rules` writes with the command in its header."""
import json
import re
from pathlib import Path

import pytest

from hetero_rt.checkpoint.source import read_tensor_meta
from hetero_rt.config import ModelArgs
from hetero_rt.placement.memory import plan_memory
from hetero_rt.placement.plan import resolve
from hetero_rt.placement.schema import SHIPPED_RULES, find_rules, load_rules
from hetero_rt.placement.sizes import parse_bytes
from hetero_rt.placement.write import write_rules

FIXTURES = Path(__file__).parent / "fixtures"

# shipped file -> (fixture with the release's config.json, model_type, layers, routed experts, GPU GiB)
FAMILY_RULES = {
    "qwen3-30b-a3b-8gb.yaml": ("qwen3_30b_a3b", "qwen3_moe", 48, 128, 8),
    "qwen3-235b-a22b-24gb.yaml": ("qwen3_235b_a22b", "qwen3_moe", 94, 128, 24),
    "mixtral-8x7b-12gb.yaml": ("mixtral_8x7b", "mixtral", 32, 8, 12),
    "glm-4.5-air-24gb.yaml": ("glm_4_5_air", "glm4_moe", 46, 128, 24),
}


def _body(text: str) -> str:
    return "".join(line for line in text.splitlines(True) if not line.startswith("#"))


@pytest.fixture(scope="module", params=sorted(FAMILY_RULES), ids=str)
def shipped(request):
    name = request.param
    fixture, model_type, layers, experts, gpu_gib = FAMILY_RULES[name]
    args = ModelArgs.from_config_file(FIXTURES / fixture / "config.json")
    assert (args.model_type, args.num_hidden_layers, args.n_routed_experts) == (model_type, layers, experts)
    meta = read_tensor_meta(FIXTURES / fixture, args)        # a directory holding only config.json
    return name, fixture, args, meta, gpu_gib


def test_shipped_family_file_resolves_and_fits_its_gpu(shipped):
    name, fixture, args, meta, gpu_gib = shipped
    path = SHIPPED_RULES / name
    text = path.read_text()
    assert text.startswith(f"# {name} — ")
    assert find_rules(name[:-len(".yaml")]) == path                  # usable as --rules NAME
    command = re.search(r"hetero-rt plan --model tests/fixtures/(\S+) --gpu-mem (\d+)GiB --host-mem (\d+)GiB",
                        text)
    assert command and command.group(1) == fixture, "the header names the command that wrote the file"
    written_gib, host_gib = int(command.group(2)), int(command.group(3))
    assert written_gib < gpu_gib                                     # room left for the CUDA context
    plan = resolve(args, load_rules(path), check_devices=False)
    assert {p.device for p in plan.placements if p.module.kind != "routed_experts"} == {"cuda"}
    on_gpu = [p for p in plan.placements if p.module.kind == "routed_experts" and p.device == "cuda"]
    on_cpu = [p for p in plan.placements if p.module.kind == "routed_experts" and p.device == "cpu"]
    assert on_gpu and on_cpu and all(p.backend == "numba" for p in on_cpu)
    budgets = {"cuda": parse_bytes(f"{gpu_gib}GiB"), "cpu": parse_bytes(f"{host_gib}GiB")}
    mem = plan_memory(args, plan, meta, 4096, "bfloat16", budgets)
    assert not mem.over(), mem.describe()
    assert mem.devices["cuda"].total <= parse_bytes(f"{written_gib}GiB"), mem.describe()
    assert mem.devices["cuda"].kv_cache > 0                          # the grouped-query K/V cache is counted
    # the header's GPU and host figures are the planner's
    gpu_said = re.search(r"([\d.]+) GiB planned", text.replace("\n# ", " "))
    host_said = re.search(r"([\d.]+) GiB of host RAM", text.replace("\n# ", " "))
    assert abs(float(gpu_said.group(1)) - mem.devices["cuda"].total / 2 ** 30) < 0.01, mem.describe()
    assert abs(float(host_said.group(1)) - mem.devices["cpu"].total / 2 ** 30) < 0.01, mem.describe()


def test_shipped_family_file_is_what_the_writer_writes(shipped):
    name, fixture, args, meta, gpu_gib = shipped
    text = (SHIPPED_RULES / name).read_text()
    written_gib = int(re.search(r"--gpu-mem (\d+)GiB", text).group(1))
    again = write_rules(args, meta, parse_bytes(f"{written_gib}GiB"), 4096, "bfloat16")
    assert _body(again) == _body(text)


def test_fixture_configs_are_the_releases():
    """A few values that set the planned sizes, as published with each release."""
    cfg = {f: json.loads((FIXTURES / f / "config.json").read_text()) for f, *_ in FAMILY_RULES.values()}
    assert (cfg["qwen3_30b_a3b"]["hidden_size"], cfg["qwen3_30b_a3b"]["moe_intermediate_size"]) == (2048, 768)
    assert (cfg["qwen3_235b_a22b"]["hidden_size"], cfg["qwen3_235b_a22b"]["moe_intermediate_size"]) == (4096, 1536)
    assert (cfg["mixtral_8x7b"]["intermediate_size"], cfg["mixtral_8x7b"]["num_local_experts"]) == (14336, 8)
    assert (cfg["glm_4_5_air"]["moe_intermediate_size"], cfg["glm_4_5_air"]["first_k_dense_replace"]) == (1408, 1)
    assert all(c["torch_dtype"] == "bfloat16" for c in cfg.values())


def test_working_buffers_of_grouped_query_attention_by_hand():
    """Qwen3-30B-A3B (32 q / 4 kv heads of 128, vocab 151936, intermediate 6144), bf16, 4096 positions, a
    512-token chunk: scores and probabilities 2 x 32 x 512 x 4096 x 4, K and V as cached 2 x 4096 x 4 x
    128 x 2 (MLA's per-head expansion would be 4096 x 32 x 128 x 2, four times more), logits
    512 x 151936 x 4, hidden 512 x 6144 x 4 x 4."""
    from hetero_rt.placement.memory import attention_kv_bytes, working_bytes
    args = ModelArgs.from_config_file(FIXTURES / "qwen3_30b_a3b" / "config.json")
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (32, 4, 128)
    assert attention_kv_bytes(args, 4096, "bfloat16") == 8_388_608
    assert working_bytes(args, 4096, "bfloat16") == 536_870_912 + 8_388_608 + 311_164_928 + 50_331_648
    v3 = ModelArgs.from_config_file(FIXTURES / "deepseek_v3" / "config.json")   # MLA: 128 heads x (128 + 128)
    assert attention_kv_bytes(v3, 4096, "bfloat16") == 4096 * 128 * (128 + 128) * 2

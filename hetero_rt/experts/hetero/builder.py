"""Building the hetero backend's layers: `build` (the registry's builder) makes one layer's
HeteroExperts from its ExpertWeights and placement, on the session the model's layers share;
cache policies come from a routing profile. `install` re-configures a loaded model's layers (for
benchmarks and tests that compare configurations on one load).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...config import PREFILL_CHUNK
from ...errors import HeteroRTError
from .. import numba_backend
from .cost_model import CostModel
from .expert_cache import DynamicPolicy, ExpertCache, StaticPolicy, expert_bytes
from .layer import HeteroExperts, link
from .prefetch import Copier
from .session import HeteroSession
from .worker import CpuWorker


PROFILE_FORMAT = "hetero_rt.routing_profile/1"   # written by bench.routing, read here


def load_profile(path: str | Path, layer: int, n_experts: int) -> np.ndarray:
    """Routing counts (E,) of one layer from a profile written by scripts/record_routing.py."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"expected a JSON object with format {PROFILE_FORMAT!r}")
        counts = data["layers"].get(str(layer))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise HeteroRTError(f"{path}: not a routing profile ({e}); record one with scripts/record_routing.py") \
            from None
    if counts is None:
        raise HeteroRTError(f"{path}: the routing profile has no counts for layer {layer}; record it on this "
                            f"model with scripts/record_routing.py")
    if not isinstance(counts, list) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) and c >= 0 for c in counts):
        raise HeteroRTError(f"{path}: layer {layer}'s counts must be a list of finite numbers >= 0; the profile is "
                            f"corrupt: record it again with scripts/record_routing.py")
    if len(counts) != n_experts:
        raise HeteroRTError(f"{path}: layer {layer} has counts for {len(counts)} experts, the model has "
                            f"{n_experts}; the profile was recorded on another model")
    return np.asarray(counts, np.float64)


def make_policy(policy: str, layer: int, n_experts: int, profile: str | None, decay: float):
    counts = load_profile(profile, layer, n_experts) if profile else None
    if policy == "static":
        if counts is None:
            raise HeteroRTError(f"layer {layer}: the static cache policy needs a routing profile "
                                f"(hetero: {{profile: FILE}}, recorded by scripts/record_routing.py)")
        return StaticPolicy.from_counts(counts)
    start = StaticPolicy.from_counts(counts).experts if counts is not None else ()
    return DynamicPolicy(n_experts, decay=decay, initial=start)


def build(weights, placement, builder) -> HeteroExperts:
    """The registry's builder: the layer's NumbaExperts over its ExpertWeights, wrapped with the cache,
    prefetch and overlap its HeteroSpec (placement.hetero) asks for, on the builder's shared session."""
    cpu = numba_backend.build(weights, placement, builder)
    return build_layer(cpu, weights.layer, placement.hetero, builder.hetero_session(), builder.args.num_experts_per_tok)


def install(model: nn.Module, specs: dict, device: torch.device | str, *, copier: Copier | None = None,
            worker: CpuWorker | None = None, max_tokens: int = PREFILL_CHUNK) -> HeteroSession:
    """Re-configure a loaded model: the routed experts of the layers in `specs` ({layer: HeteroSpec})
    go on the hetero backend with a new session (the previous one is closed), the other hetero layers
    back to their NumbaExperts. Those layers' experts must be NumbaExperts or HeteroExperts (whose
    NumbaExperts is reused). The cache lives on `device` in the dtype of the model's embedding."""
    old = hetero_session(model)
    if old is not None:
        old.close()
    args = model.args
    dtype = model.embed.weight.dtype
    session = HeteroSession(device, dtype, args.hidden_size, args.num_experts_per_tok, max_tokens, copier, worker)
    previous = None
    for layer, block in enumerate(model.layers):
        experts = getattr(block.ffn, "experts", None)
        if experts is None:
            continue
        if isinstance(experts, HeteroExperts):
            experts = experts.host
        if layer in specs:
            experts = build_layer(experts, layer, specs[layer], session, args.num_experts_per_tok)
        block.ffn.experts = experts
        link(previous, block.ffn.gate, experts)
        previous = experts
    return session


def build_layer(cpu, layer: int, spec, session: HeteroSession, topk: int) -> HeteroExperts:
    if not hasattr(cpu, "run"):
        raise HeteroRTError(f"layer {layer}: the hetero backend wraps NumbaExperts, got {type(cpu).__name__}")
    if not 0 <= spec.defer < topk:
        raise HeteroRTError(f"layer {layer}: hetero.defer={spec.defer} must be below the {topk} experts per token "
                            f"(rules line {spec.line})")
    slots = spec.slots(expert_bytes(cpu.inter_dim, cpu.dim, session.dtype), cpu.n_experts)
    cache = None
    if slots:
        policy = make_policy(spec.policy, layer, cpu.n_experts, spec.profile, spec.decay)
        cache = ExpertCache(cpu, slots, session.device, session.dtype, policy, session.copier, layer)
    cost = CostModel(pcie_gbps=spec.pcie_gbps, cpu_gflops=spec.cpu_gflops) if spec.stream else None
    return HeteroExperts(cpu, layer, session, cache, overlap=spec.overlap, prefetch=spec.prefetch and cache is not None,
                         defer=spec.defer, cost=cost)


def hetero_session(model: nn.Module) -> HeteroSession | None:
    """The session of a model's hetero layers (None when no layer is on the hetero backend)."""
    return next((m.session for m in model.modules() if isinstance(m, HeteroExperts)), None)

"""Recording routing: which experts each MoE layer chose, call by call, for a routing-frequency
profile (the static cache policy) and a trace (Belady's optimum, policy simulation).

Profile file (JSON): {"format": "hetero_rt.routing_profile/1", "model": ..., "n_experts": E,
"tokens": N, "layers": {"L": [tokens routed to each expert]}}. Trace file (.npz): for every MoE layer L,
`ids_L` (N, K) int16 routing of every token in call order and `calls_L` (C + 1,) offsets of the calls
(a prefill chunk is one call, each decode step one call).

Legend: T tokens, K experts per token, E experts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import HeteroRTError
from ..experts.hetero.builder import PROFILE_FORMAT  # the reader owns the format


class RoutingRecorder:
    """with RoutingRecorder(model) as rec: ... run prompts ...; forward hooks on every MoE gate."""

    def __init__(self, model: nn.Module):
        self.gates = {i: b.ffn.gate for i, b in enumerate(model.layers) if hasattr(b.ffn, "gate")}
        self.calls: dict[int, list[np.ndarray]] = {i: [] for i in self.gates}
        self.n_experts = next(iter(self.gates.values())).weight.shape[0] if self.gates else 0
        self.handles = []

    def __enter__(self) -> "RoutingRecorder":
        for layer, gate in self.gates.items():
            self.handles.append(gate.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, layer: int):
        def record(module, inputs, output):
            self.calls[layer].append(output[1].detach().cpu().numpy().astype(np.int16))  # (T, K)
        return record

    def counts(self, layer: int) -> np.ndarray:
        out = np.zeros(self.n_experts, np.int64)
        for ids in self.calls[layer]:
            np.add.at(out, ids.reshape(-1).astype(np.int64), 1)
        return out

    def profile(self, model_name: str = "") -> dict:
        tokens = sum(len(c) for c in next(iter(self.calls.values()), []))
        return {"format": PROFILE_FORMAT, "model": model_name, "n_experts": self.n_experts, "tokens": tokens,
                "layers": {str(layer): self.counts(layer).tolist() for layer in self.calls}}

    def save(self, profile_path: str | Path | None = None, trace_path: str | Path | None = None,
             model_name: str = "") -> None:
        if profile_path is not None:
            Path(profile_path).write_text(json.dumps(self.profile(model_name)))
        if trace_path is not None:
            arrays = {}
            for layer, calls in self.calls.items():
                if not calls:
                    continue
                arrays[f"ids_{layer}"] = np.concatenate(calls)
                arrays[f"calls_{layer}"] = np.cumsum([0] + [len(c) for c in calls])
            np.savez_compressed(trace_path, **arrays)


def load_trace(path: str | Path) -> dict[int, list[np.ndarray]]:
    """{layer: [ids (T, K) int64 per call]} from a trace written by RoutingRecorder.save."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise HeteroRTError(f"{path}: not a routing trace ({e}); record one with scripts/record_routing.py") from None
    out = {}
    for key in data.files:
        if key.startswith("ids_"):
            layer = int(key[4:])
            ids, calls = data[key].astype(np.int64), data[f"calls_{layer}"]
            out[layer] = [ids[a:b] for a, b in zip(calls[:-1], calls[1:])]
    return out


def record_routing(runtime, prompts: list[list[int]], max_new_tokens: int = 16) -> RoutingRecorder:
    """Greedy-generate max_new_tokens after each prompt (token ids) with hooks on every gate."""
    with RoutingRecorder(runtime.model) as rec:
        for ids in prompts:
            runtime.generate(ids, max_new_tokens=max_new_tokens)
    return rec


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (synthetic checkpoints have no meaningful text)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, length).tolist() for _ in range(n)]

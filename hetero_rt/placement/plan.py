"""resolve(args, rules) -> Plan: where every module of the model lives and what runs it, computed
from the config and the rule file alone (no weights), so it can be printed and tested before loading.

Modules are named by their Hugging Face paths (`model.layers.12.mlp.experts`) and have a kind:
embedding, attention (MLA or GQA with its norms), gate, shared_experts, routed_experts, dense_mlp, norm,
lm_head. Precedence: `defaults`, then every matching rule in file order, field by field; the last
rule that sets a field wins.

Constraint of the current runtime: every module except the routed experts runs on one main device
with one dtype (hidden states cross devices only inside the routed-experts backend); routed experts
may live on that device or the CPU, layer by layer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from ..checkpoint.names import names_for
from ..config import ModelArgs
from ..experts import registry
from .schema import FORMAT_KINDS, HeteroSpec, PlacementError, Place, RuleSet


@dataclass(frozen=True)
class Module:
    path: str
    kind: str
    layer: int | None = None


@dataclass(frozen=True)
class Placement:
    module: Module
    device: str
    dtype: str | None          # compute dtype; None: float32 for fp32 checkpoints, else bfloat16
    format: str | None         # storage of 2-D weights: None/"dtype" (in dtype) or "float8_e4m3"
    backend: str | None        # routed experts only
    threads: int | None        # routed experts on the CPU only
    lines: tuple[int, ...]     # lines of the rules that set a field (for messages and `plan`)
    hetero: HeteroSpec | None = None  # routed experts on backend hetero: cache, policy, prefetch, ...
    activations: str | None = None    # routed experts on numba/hetero, format: stored weights: "fp32" (default) or "int8"


@dataclass(frozen=True)
class Plan:
    source: str
    placements: tuple[Placement, ...]
    written_devices: tuple[str, ...]  # devices as the rules wrote them, before any CPU fallback
    cpu_fallback: bool = False

    @property
    def main(self) -> Placement:
        return next(p for p in self.placements if p.module.kind != "routed_experts")

    @cached_property
    def _by_path(self) -> dict[str, Placement]:
        return {p.module.path: p for p in self.placements}

    def owner(self, tensor: str) -> Placement | None:
        """The placement of the module holding an HF tensor name (longest path prefix); None for
        tensors no module loads (MTP layers, rope buffers)."""
        parts = tensor.split(".")
        for k in range(len(parts) - 1, 0, -1):
            p = self._by_path.get(".".join(parts[:k]))
            if p is not None:
                return p
        return None

    def experts(self, layer: int) -> Placement:
        return next(p for p in self.placements if p.module.kind == "routed_experts" and p.module.layer == layer)

    def summary(self) -> str:
        """One line: where the dense part runs and what runs the routed experts."""
        main = self.main
        dense = f"dense part on {main.device}" + (f" {main.dtype}" if main.dtype else "")
        stored = sorted({p.module.kind for p in self.placements if p.format == "stored"})
        if stored:
            dense += f" (stored: {', '.join(stored)})"
        experts: dict[tuple, int] = {}
        for p in self.placements:
            if p.module.kind == "routed_experts":
                key = (p.backend, p.device, p.activations)
                experts[key] = experts.get(key, 0) + 1
        parts = [f"{n} layer{'s' * (n > 1)} {b} on {d}" + (f" ({a} activations)" if a else "")
                 for (b, d, a), n in experts.items()]
        return f"placement {self.source}: {dense}; routed experts: {', '.join(parts) or 'none'}"

    def describe(self) -> str:
        rows = [f"placement from {self.source}" + ("  [cpu fallback: every device mapped to cpu]"
                                                  if self.cpu_fallback else "")]
        groups: dict[tuple, list[str]] = {}
        for p, written in zip(self.placements, self.written_devices):
            key = (p.module.kind, written, p.device, p.dtype, p.format, p.backend, p.threads, p.activations,
                   _hetero_text(p.hetero))
            groups.setdefault(key, []).append(p.module.path)
        for (kind, written, dev, dtype, fmt, backend, threads, act, hetero), paths in groups.items():
            shown = written if written == dev else f"{written} -> {dev}"
            extra = "".join(f" {k}={v}" for k, v in (("dtype", dtype), ("format", fmt), ("backend", backend),
                                                      ("threads", threads), ("activations", act),
                                                      ("hetero", hetero)) if v is not None)
            rows.append(f"  {kind:15s} {shown:12s}{extra}  ({len(paths)} module{'s' * (len(paths) > 1)}, "
                        f"e.g. {paths[0]})")
        return "\n".join(rows)


def _hetero_text(h: HeteroSpec | None) -> str | None:
    if h is None:
        return None
    cache = h.cache_slots if h.cache_bytes is None else f"{h.cache_bytes}B"
    return (f"{{cache: {cache or 0}, policy: {h.policy}, prefetch: {h.prefetch}, overlap: {h.overlap}, "
            f"defer: {h.defer}, stream: {h.stream}}}")


def model_modules(args: ModelArgs) -> list[Module]:
    names = names_for(args)        # the family's module paths (Mixtral: block_sparse_moe; Qwen2: shared_expert)
    mods = [Module("model.embed_tokens", "embedding")]
    for i in range(args.num_hidden_layers):
        pre, moe = f"model.layers.{i}", f"model.layers.{i}.{names.moe}"
        mods += [Module(f"{pre}.input_layernorm", "norm", i), Module(f"{pre}.self_attn", "attention", i),
                 Module(f"{pre}.post_attention_layernorm", "norm", i)]
        if args.is_moe_layer(i):
            mods += [Module(f"{moe}.gate", "gate", i), Module(f"{moe}.experts", "routed_experts", i)]
            if args.n_shared_experts:
                mods += [Module(f"{pre}.{path}", "shared_experts", i) for path in names.shared]
        else:
            mods.append(Module(f"{pre}.mlp", "dense_mlp", i))
    mods.append(Module("model.norm", "norm"))
    if not args.tie_word_embeddings:
        mods.append(Module("lm_head", "lm_head"))
    return mods


def resolve(args: ModelArgs, rules: RuleSet, cpu_fallback: bool = False, check_devices: bool = True) -> Plan:
    """check_devices=False plans for the devices the rules name without asking whether this machine
    has them (`hetero-rt plan` for a GPU elsewhere)."""
    modules = model_modules(args)
    used = [False] * len(rules.rules)
    placements = []
    for m in modules:
        place, lines = rules.defaults or Place(), []
        if rules.defaults is not None:
            lines.append(rules.defaults.line)
        for i, rule in enumerate(rules.rules):
            if rule.matches(m.path, m.kind):
                used[i] = True
                place = _merge(place, rule.place)
                lines.append(rule.line)
        placements.append(_placement(rules.source, m, place, tuple(lines)))
    for rule, hit in zip(rules.rules, used):
        if not hit:
            raise PlacementError(f"{rules.source}:{rule.line}: rule matches no module of this model "
                                 f"({args.model_type}, {args.num_hidden_layers} layers); module paths look like "
                                 f"'model.layers.3.mlp.experts' (see `hetero-rt plan`)")
    _check_single_main(rules.source, placements)
    return _apply_fallback(rules.source, placements, cpu_fallback, check_devices)


def _merge(base: Place, over: Place) -> Place:
    fields = {k: getattr(over, k) for k in ("device", "dtype", "format", "backend", "threads", "activations", "hetero")
              if getattr(over, k) is not None}
    return replace(base, **fields)


def _placement(source: str, m: Module, place: Place, lines: tuple[int, ...]) -> Placement:
    where = f"{source}:{lines[-1]}" if lines else source
    if place.device is None:
        raise PlacementError(f"{source}: no rule places module {m.path} (kind {m.kind}); add a rule for kind "
                             f"{m.kind!r} or a 'defaults: {{device: ...}}'")
    backend, threads, hetero, act = place.backend, place.threads, place.hetero, place.activations
    if m.kind == "routed_experts":
        backend = backend or registry.DEFAULT
        options = registry.get(backend).options
        if act is not None and "activations" not in options:
            raise PlacementError(f"{where}: {m.path}: activations {act!r} is a setting of the numba kernels "
                                 f"(backend {' or '.join(registry.with_option('activations'))}); the rules give "
                                 f"backend {backend!r}")
        if registry.get(backend).cpu_only and place.device != "cpu":
            raise PlacementError(f"{where}: {m.path}: backend {backend!r} runs on the CPU, but the rules put it "
                                 f"on {place.device!r}")
        if hetero is not None and "hetero" not in options:
            raise PlacementError(f"{source}:{hetero.line}: {m.path}: hetero settings need backend "
                                 f"{' or '.join(registry.with_option('hetero'))}, the rules give backend {backend!r}")
        if "hetero" in options and hetero is None:
            hetero = HeteroSpec(cache_slots=0, prefetch=False)
    elif place.format not in (None, "dtype") and m.kind not in FORMAT_KINDS[place.format]:
        raise PlacementError(f"{where}: {m.path}: format {place.format!r} is available for "
                             f"{', '.join(FORMAT_KINDS[place.format])}, not {m.kind}")
    elif place.format == "stored" and place.device != "cpu":
        raise PlacementError(f"{where}: {m.path}: format 'stored' multiplies GGUF weights in place on the CPU, "
                             f"but the rules put it on {place.device!r}; use the default format on a GPU")
    elif act is not None and place.format != "stored":
        raise PlacementError(f"{where}: {m.path}: activations {act!r} is a setting of the CPU kernels, which run "
                             f"{m.kind} only with format: stored")
    elif backend is not None or threads is not None or hetero is not None:
        field = "backend" if backend is not None else "threads" if threads is not None else "hetero"
        raise PlacementError(f"{where}: {field} cannot be set for {m.path} (kind {m.kind}); only routed_experts "
                             f"take a backend and threads")
    fmt = None if place.format == "dtype" else place.format
    return Placement(m, place.device, place.dtype, fmt, backend, threads, lines, hetero, act)


def _check_single_main(source: str, placements: list[Placement]) -> None:
    main = [p for p in placements if p.module.kind != "routed_experts"]
    first = main[0]
    for p in main[1:]:
        for field in ("device", "dtype"):
            if getattr(p, field) != getattr(first, field):
                raise PlacementError(
                    f"{source}: {p.module.path} gets {field} {getattr(p, field)!r} but {first.module.path} gets "
                    f"{getattr(first, field)!r}; every module except routed_experts runs on one device with one "
                    f"dtype (rule lines {list(p.lines)} vs {list(first.lines)})")


def _apply_fallback(source: str, placements: list[Placement], cpu_fallback: bool, check_devices: bool) -> Plan:
    written = tuple(p.device for p in placements)
    wants_cuda = any(d.startswith("cuda") for d in written)
    if wants_cuda and not cpu_fallback and check_devices:
        missing = [d for d in sorted(set(written)) if d.startswith("cuda") and not _cuda_device_exists(d)]
        if missing:
            raise PlacementError(f"{source}: the rules place modules on {', '.join(missing)} but no such CUDA "
                                 f"device is available; run with --cpu-fallback (API: cpu_fallback=True) to map "
                                 f"every device to the CPU, or edit the rules")
    if cpu_fallback:
        placements = [replace(p, device="cpu") for p in placements]
    return Plan(source, tuple(placements), written, cpu_fallback and wants_cuda)


def _cuda_device_exists(device: str) -> bool:
    if not torch.cuda.is_available():
        return False
    index = int(device.split(":")[1]) if ":" in device else 0
    return index < torch.cuda.device_count()

"""Placement rule files: YAML read with yaml's safe composer, validated against a closed vocabulary,
every error reported as `file:line: what is wrong; what was expected`.

    defaults:                      # optional; applied to every module before any rule
      device: cuda
    rules:                         # applied in file order; a later match overrides field by field
      - match: {kind: routed_experts}              # kind and/or name (a regex, full match)
        place: {device: cpu, backend: numba, threads: 16}
      - match: {name: 'model\\.layers\\.[3-5]\\.mlp\\.experts'}
        place: {device: cuda, backend: torch}

The full reference is docs/placement_rules.md.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import yaml

from ..errors import HeteroRTError
from ..experts import registry
from ..experts.numba_backend import ACTIVATIONS  # the numba kernels' activation modes
from .sizes import parse_bytes

KINDS = ("embedding", "attention", "gate", "shared_experts", "routed_experts", "dense_mlp", "norm", "lm_head")
BACKEND_KINDS = ("routed_experts",)   # the kinds that take a backend (hetero_rt.experts.registry)
DTYPES = ("float32", "bfloat16", "float16")
# How 2-D weights are stored: in `dtype`; FP8 with 128x128 block scales; or, for GGUF files on the CPU,
# as the file stores them (ggml types, multiplied in place by numba kernels: kernels.stored).
FORMATS = ("dtype", "float8_e4m3", "stored")
FP8_KINDS = ("attention", "shared_experts", "dense_mlp")  # the kinds whose matmuls expand FP8 weights
FORMAT_KINDS = {"float8_e4m3": FP8_KINDS, "stored": FP8_KINDS + ("lm_head", "embedding")}
PLACE_KEYS = ("device", "dtype", "format", "backend", "threads", "activations", "hetero")
HETERO_KEYS = ("cache", "policy", "profile", "decay", "prefetch", "overlap", "defer", "stream", "pcie_gbps",
               "cpu_gflops")
POLICIES = ("static", "dynamic")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
MAX_FILE_BYTES = 1 << 20     # a placement file is a few hundred bytes; larger input is refused unread
MAX_THREADS = 4096
REGEX_TIMEOUT_S = 0.5        # per module path: a name pattern that backtracks longer is refused, never hangs


class PlacementError(HeteroRTError, ValueError):
    """A placement file is malformed or does not fit the model."""


@dataclass(frozen=True)
class HeteroSpec:
    """The `hetero:` mapping of a routed_experts place (backend hetero); docs/placement_rules.md.
    cache: GPU expert-cache size per layer, in slots (cache_slots) or bytes (cache_bytes)."""
    cache_slots: int | None = None
    cache_bytes: int | None = None
    policy: str = "dynamic"
    profile: str | None = None        # routing profile (scripts/record_routing.py), absolute path
    decay: float = 0.95
    prefetch: bool = True
    overlap: bool = True
    defer: int = 0
    stream: bool = False              # per-layer cost model for long prompts: CPU or stream to GPU
    pcie_gbps: float = 25.0
    cpu_gflops: float = 1000.0
    line: int = 0

    def slots(self, expert_bytes: int, n_experts: int) -> int:
        """Cache slots per layer: as given, or as many experts as fit in cache_bytes; at most E."""
        n = self.cache_bytes // expert_bytes if self.cache_bytes is not None else (self.cache_slots or 0)
        return min(n, n_experts)


@dataclass(frozen=True)
class Place:
    """Fields a rule may set; None means 'not set by this rule'."""
    device: str | None = None
    dtype: str | None = None
    format: str | None = None
    backend: str | None = None
    threads: int | None = None
    activations: str | None = None
    hetero: HeteroSpec | None = None
    line: int = 0


@dataclass(frozen=True)
class Rule:
    name: regex.Pattern | None
    kind: str | None
    place: Place
    line: int
    source: str = ""

    def matches(self, path: str, kind: str) -> bool:
        if self.kind is not None and self.kind != kind:
            return False
        if self.name is None:
            return True
        try:
            return bool(self.name.fullmatch(path, timeout=REGEX_TIMEOUT_S))
        except TimeoutError:
            raise PlacementError(f"{self.source}:{self.line}: the name pattern {self.name.pattern!r} backtracked for "
                                 f"more than {REGEX_TIMEOUT_S} s on {path!r}; simplify it (module paths look like "
                                 f"'model.layers.3.mlp.experts')") from None


@dataclass(frozen=True)
class RuleSet:
    source: str
    defaults: Place | None
    rules: tuple[Rule, ...] = field(default_factory=tuple)


def load_rules(path: str | Path) -> RuleSet:
    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"{path}: placement file not found; ship one from placement_rules/ or write your own "
                             f"(see docs/placement_rules.md)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise PlacementError(f"{path}: {path.stat().st_size} bytes is not a placement file (at most "
                             f"{MAX_FILE_BYTES} bytes)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PlacementError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    return parse_rules(text, str(path))


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    if len(text) > MAX_FILE_BYTES:
        raise PlacementError(f"{source}: {len(text)} characters is not a placement file (at most {MAX_FILE_BYTES})")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise PlacementError(f"{source}: nested too deeply to be a placement file (rules are a list of "
                             f"{{match, place}} mappings)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise PlacementError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        raise PlacementError(f"{source}: empty placement file; expected 'rules:' (and optionally 'defaults:')")
    return _Parser(source).ruleset(root)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.constructor = yaml.SafeLoader("")  # builds plain Python values from scalar nodes only

    def fail(self, node: yaml.Node, msg: str) -> PlacementError:
        return PlacementError(f"{self.source}:{node.start_mark.line + 1}: {msg}")

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping with keys {', '.join(allowed)}")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key not in allowed:
                raise self.fail(k, f"unknown key {key!r} in {what}; expected one of {', '.join(allowed)}")
            if key in out:
                raise self.fail(k, f"key {key!r} appears twice in {what}")
            out[key] = v
        return out

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return self.constructor.construct_object(node)

    def ruleset(self, root: yaml.Node) -> RuleSet:
        top = self.mapping(root, "the placement file", ("defaults", "rules"))
        defaults = self.place(top["defaults"], "defaults", None) if "defaults" in top else None
        if "rules" not in top:
            raise self.fail(root, "missing 'rules:' (a list of {match, place})")
        rules_node = top["rules"]
        if not isinstance(rules_node, yaml.SequenceNode):
            raise self.fail(rules_node, "'rules' must be a list of {match: ..., place: ...}")
        return RuleSet(self.source, defaults, tuple(self.rule(n) for n in rules_node.value))

    def rule(self, node: yaml.Node) -> Rule:
        parts = self.mapping(node, "a rule", ("match", "place"))
        for key in ("match", "place"):
            if key not in parts:
                raise self.fail(node, f"rule has no '{key}:'; each rule needs match and place")
        match = self.mapping(parts["match"], "match", ("name", "kind"))
        if not match:
            raise self.fail(parts["match"], "match is empty; give name (a regex) and/or kind")
        kind = None
        if "kind" in match:
            kind = self.scalar(match["kind"], "kind")
            if kind not in KINDS:
                raise self.fail(match["kind"], f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        name = None
        if "name" in match:
            pattern = self.scalar(match["name"], "name")
            try:
                name = regex.compile(str(pattern))
            except regex.error as e:
                raise self.fail(match["name"], f"invalid regex {pattern!r}: {e}") from None
        return Rule(name, kind, self.place(parts["place"], "place", kind), node.start_mark.line + 1, self.source)

    def place(self, node: yaml.Node, what: str, kind: str | None) -> Place:
        fields = self.mapping(node, what, PLACE_KEYS)
        values: dict[str, Any] = {}
        for key, vnode in fields.items():
            if key == "hetero":
                values[key] = self.hetero(vnode, kind)
                continue
            value = self.scalar(vnode, key)
            values[key] = self.check(key, value, vnode, kind)
        if values.get("backend") in registry.cpu_only() and values.get("device", "cpu") != "cpu":
            raise self.fail(node, f"backend {values['backend']!r} runs on the CPU; it cannot be placed on "
                                  f"{values['device']!r}")
        return Place(line=node.start_mark.line + 1, **values)

    def hetero(self, node: yaml.Node, kind: str | None) -> HeteroSpec:
        if kind is not None and kind != "routed_experts":
            raise self.fail(node, f"hetero settings apply to routed_experts, not {kind}")
        fields = self.mapping(node, "hetero", HETERO_KEYS)
        v: dict[str, Any] = {}
        for key, vnode in fields.items():
            value = self.scalar(vnode, f"hetero.{key}")
            v.update(self.hetero_value(key, value, vnode))
        if v.get("policy") == "static" and v.get("prefetch"):
            raise self.fail(node, "prefetch replaces cached experts, the static policy keeps a fixed set: use "
                                  "policy: dynamic, or prefetch: false")
        if v.get("policy") == "static" and not v.get("profile"):
            raise self.fail(node, "policy static needs profile: FILE (a routing profile recorded by "
                                  "scripts/record_routing.py)")
        v.setdefault("prefetch", v.get("policy", "dynamic") == "dynamic")
        return HeteroSpec(line=node.start_mark.line + 1, **v)

    def hetero_value(self, key: str, value: Any, node: yaml.Node) -> dict[str, Any]:
        def number(positive_int=False, lo=None, hi=None):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if positive_int:
                ok = ok and isinstance(value, int)
            if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
                raise self.fail(node, f"hetero.{key} must be {what[key]}, found {value!r}")
            return value
        what = {"decay": "a number in (0, 1]", "defer": "an integer >= 0 (experts per token added one layer "
                "later)", "pcie_gbps": "a positive number (GB/s)", "cpu_gflops": "a positive number (GFLOP/s)"}
        if key == "cache":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return {"cache_slots": value}
            if isinstance(value, str):
                try:
                    return {"cache_bytes": parse_bytes(value, "hetero.cache")}
                except HeteroRTError as e:
                    raise self.fail(node, str(e)) from None
            raise self.fail(node, f"hetero.cache must be a number of expert slots (e.g. 16) or a size "
                                  f"(e.g. 2GiB), found {value!r}")
        if key == "policy":
            if value not in POLICIES:
                raise self.fail(node, f"unknown cache policy {value!r}; expected one of {', '.join(POLICIES)}")
            return {key: value}
        if key == "profile":
            if not isinstance(value, str) or not value:
                raise self.fail(node, f"hetero.profile must be a file path, found {value!r}")
            path = Path(value)
            if not path.is_absolute() and Path(self.source).is_file():
                path = Path(self.source).parent / path
            if not path.is_file():
                raise self.fail(node, f"routing profile {str(path)!r} not found; record one with "
                                      f"scripts/record_routing.py")
            return {key: str(path)}
        if key in ("prefetch", "overlap", "stream"):
            if not isinstance(value, bool):
                raise self.fail(node, f"hetero.{key} must be true or false, found {value!r}")
            return {key: value}
        if key == "decay":
            number(lo=1e-9, hi=1.0)
            return {key: float(value)}
        if key == "defer":
            return {key: number(positive_int=True, lo=0)}
        return {key: float(number(lo=1e-9))}

    def check(self, key: str, value: Any, node: yaml.Node, kind: str | None) -> Any:
        if key == "device":
            if not isinstance(value, str) or not _DEVICE.match(value):
                raise self.fail(node, f"unknown device {value!r}; expected cpu, cuda or cuda:N")
        elif key == "dtype":
            if value not in DTYPES:
                raise self.fail(node, f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
        elif key == "format":
            if value not in FORMATS:
                raise self.fail(node, f"unknown format {value!r}; expected one of {', '.join(FORMATS)}")
            if value != "dtype" and kind is not None and kind not in FORMAT_KINDS[value]:
                raise self.fail(node, f"format {value!r} is available for {', '.join(FORMAT_KINDS[value])}, "
                                      f"not {kind}")
        elif key == "backend":
            allowed = sorted(registry.names())
            if value not in allowed:
                raise self.fail(node, f"unknown backend {value!r}; expected one of {', '.join(allowed)}")
            if kind is not None and kind not in BACKEND_KINDS:
                raise self.fail(node, f"backend {value!r} cannot run kind {kind!r}; only "
                                      f"{', '.join(BACKEND_KINDS)} has a choice of backend")
        elif key == "threads":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_THREADS:
                raise self.fail(node, f"threads must be a positive integer (at most {MAX_THREADS}), found {value!r}")
        elif key == "activations":
            if value not in ACTIVATIONS:
                raise self.fail(node, f"unknown activations {value!r}; expected one of {', '.join(ACTIVATIONS)}")
            if kind is not None and kind != "routed_experts" and kind not in FORMAT_KINDS["stored"]:
                raise self.fail(node, f"activations is a setting of the CPU kernels (routed_experts on numba/hetero, "
                                      f"format: stored weights of {', '.join(FORMAT_KINDS['stored'])}), not {kind}")
        return value

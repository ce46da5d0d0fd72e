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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import HeteroRTError

KINDS = ("embedding", "attention", "gate", "shared_experts", "routed_experts", "dense_mlp", "norm", "lm_head")
BACKENDS = {"routed_experts": ("torch", "numba")}
DTYPES = ("float32", "bfloat16", "float16")
# How 2-D weights are stored: in `dtype`; FP8 with 128x128 block scales; or, for GGUF files on the CPU,
# as the file stores them (ggml types, multiplied in place by numba kernels: quant.stored).
FORMATS = ("dtype", "float8_e4m3", "stored")
FP8_KINDS = ("attention", "shared_experts", "dense_mlp")  # the kinds whose matmuls expand FP8 weights
FORMAT_KINDS = {"float8_e4m3": FP8_KINDS, "stored": FP8_KINDS + ("lm_head",)}
PLACE_KEYS = ("device", "dtype", "format", "backend", "threads")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
CPU_ONLY_BACKENDS = ("numba",)


class PlacementError(HeteroRTError, ValueError):
    """A placement file is malformed or does not fit the model."""


@dataclass(frozen=True)
class Place:
    """Fields a rule may set; None means 'not set by this rule'."""
    device: str | None = None
    dtype: str | None = None
    format: str | None = None
    backend: str | None = None
    threads: int | None = None
    line: int = 0


@dataclass(frozen=True)
class Rule:
    name: re.Pattern | None
    kind: str | None
    place: Place
    line: int

    def matches(self, path: str, kind: str) -> bool:
        return (self.kind is None or self.kind == kind) and (self.name is None or bool(self.name.fullmatch(path)))


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
    return parse_rules(path.read_text(encoding="utf-8"), str(path))


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
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
                name = re.compile(str(pattern))
            except re.error as e:
                raise self.fail(match["name"], f"invalid regex {pattern!r}: {e}") from None
        return Rule(name, kind, self.place(parts["place"], "place", kind), node.start_mark.line + 1)

    def place(self, node: yaml.Node, what: str, kind: str | None) -> Place:
        fields = self.mapping(node, what, PLACE_KEYS)
        values: dict[str, Any] = {}
        for key, vnode in fields.items():
            value = self.scalar(vnode, key)
            values[key] = self.check(key, value, vnode, kind)
        if values.get("backend") in CPU_ONLY_BACKENDS and values.get("device", "cpu") != "cpu":
            raise self.fail(node, f"backend {values['backend']!r} runs on the CPU; it cannot be placed on "
                                  f"{values['device']!r}")
        return Place(line=node.start_mark.line + 1, **values)

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
            allowed = sorted({b for bs in BACKENDS.values() for b in bs})
            if value not in allowed:
                raise self.fail(node, f"unknown backend {value!r}; expected one of {', '.join(allowed)}")
            if kind is not None and kind not in BACKENDS:
                raise self.fail(node, f"backend {value!r} cannot run kind {kind!r}; only "
                                      f"{', '.join(BACKENDS)} has a choice of backend")
        elif key == "threads":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise self.fail(node, f"threads must be a positive integer, found {value!r}")
        return value

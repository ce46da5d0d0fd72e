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

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import yaml

from ..errors import HeteroRTError
from ..experts import registry
from ..experts.hetero.builder import PROFILE_FORMAT  # its reader owns the format
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
# Bounds on hostile or broken input: a placement file is ~1 KB, ~100 YAML nodes, 6 levels deep.
MAX_FILE_BYTES = 1 << 20     # larger input is refused unread
MAX_DEPTH = 20               # YAML nesting; deeper input is refused before yaml's composer recurses
MAX_NODES = 20_000           # YAML nodes (an alias counts once: yaml never expands one, so no billion laughs)
MAX_PATTERN_CHARS = 4096     # a `name` regex (write_rules' per-layer alternations are ~200)
MAX_REPEAT_COST = 10_000     # a `name` regex's counted repeats, multiplied out: regex compiles {n} by copying
MAX_PROFILE_BYTES = 64 << 20  # a routing profile is E x layers counts, ~100 KB for DeepSeek-V3
MAX_THREADS = 4096
REGEX_TIMEOUT_S = 0.5        # per module path: a name pattern that backtracks longer is refused, never hangs
# hetero numbers: the largest value that still means something (anything above is a typo or an attack)
MAX_CACHE_SLOTS = 1 << 16    # experts per layer (the cache never holds more than E anyway)
MAX_CACHE_BYTES = 1 << 50    # 1 PiB
MAX_DEFER = 1024             # experts per token
MAX_PCIE_GBPS = 10_000.0
MAX_CPU_GFLOPS = 1e7


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
            raise PlacementError(f"{self.source}:{self.line}: the name pattern {_show(self.name.pattern)} backtracked "
                                 f"for more than {REGEX_TIMEOUT_S} s on {path!r}; simplify it (module paths look "
                                 f"like 'model.layers.3.mlp.experts')") from None


@dataclass(frozen=True)
class RuleSet:
    source: str
    defaults: Place | None
    rules: tuple[Rule, ...] = field(default_factory=tuple)


SHIPPED_RULES = Path(__file__).resolve().parent.parent / "placement_rules"   # packaged with hetero_rt


def shipped_rules() -> list[str]:
    """Names of the placement files shipped with the package (without .yaml)."""
    return sorted(p.stem for p in SHIPPED_RULES.glob("*.yaml"))


def find_rules(path: str | Path) -> Path:
    """A placement file by path, or by the name of a shipped one ("gguf-cpu-only" or
    "gguf-cpu-only.yaml", also "placement_rules/gguf-cpu-only.yaml" from any directory)."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.name if given.parent in (Path("."), Path("placement_rules")) else None
    for candidate in ([name, f"{name}.yaml"] if name else []):
        if (SHIPPED_RULES / candidate).is_file():
            return SHIPPED_RULES / candidate
    raise PlacementError(f"{path}: placement file not found; give a path, or the name of a shipped one "
                         f"({', '.join(shipped_rules())}), or write your own (see docs/placement_rules.md)")


def load_rules(path: str | Path) -> RuleSet:
    path = find_rules(path)
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
        root = yaml.compose(text, Loader=_BoundedLoader)
    except _TooLarge as e:
        raise PlacementError(f"{source}: {e} at line {e.line} to be a placement file (a short list of "
                             f"{{match, place}} mappings)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise PlacementError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        raise PlacementError(f"{source}: empty placement file; expected 'rules:' (and optionally 'defaults:')")
    return _Parser(source).ruleset(root)


class _TooLarge(Exception):
    def __init__(self, what: str, line: int):
        super().__init__(what)
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """yaml's safe composer, refusing input nested deeper than MAX_DEPTH (its composer recurses per level:
    RecursionError otherwise) or holding more than MAX_NODES nodes (memory: ~0.5 KB per node)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = self.nodes = 0

    def compose_node(self, parent, index):
        self.depth, self.nodes = self.depth + 1, self.nodes + 1
        if self.depth > MAX_DEPTH or self.nodes > MAX_NODES:
            what = (f"nested too deeply (more than {MAX_DEPTH} levels)" if self.depth > MAX_DEPTH else
                    f"too many values (more than {MAX_NODES} YAML nodes)")
            raise _TooLarge(what, self.peek_event().start_mark.line + 1)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _show(value: Any, limit: int = 80) -> str:
    """repr(value), cut short: a message quotes the offending value, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_number(value: Any) -> bool:
    """A finite int or float; not a bool (YAML's true is an int to Python). A huge int is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


_QUANTIFIER = regex.compile(r"\{(\d*)(?:,(\d*))?\}")


def _repeat_cost(pattern: str) -> int:
    """About how many atoms regex compiles `pattern` to, counted repeats copied out: nested {n} multiply,
    neighbours add. It may count high (alternatives add, escapes and classes count 1), never low."""
    groups, last, i = [0], 0, 0     # atoms of each open group; atoms of the item a {n} would repeat
    while i < len(pattern):
        c, step, atom = pattern[i], 1, True
        if c == "\\":
            step = 2
        elif c == "[":              # to the first unescaped ]: a nested V1 set ends early, which counts high
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            step = j + 1 - i
        elif c == "(":
            groups.append(0)
            atom = False
        elif c == ")" and len(groups) > 1:
            last = groups.pop()
            groups[-1] += last
            atom = False
        elif (m := _QUANTIFIER.match(pattern, i)) and (m.group(1) or m.group(2)):
            n = max(int(m.group(1) or 0), int(m.group(2) or 0))
            groups[-1] += last * (n - 1)
            last, step, atom = last * n, m.end() - i, False
        if atom:
            groups[-1] += 1
            last = 1
        i += step
    return sum(groups)


# hetero key: (lowest, highest, what the message says is expected)
_HETERO_NUMBERS = {
    "decay": (1e-9, 1.0, "a number in (0, 1]"),
    "defer": (0, MAX_DEFER, f"an integer from 0 to {MAX_DEFER} (experts per token added one layer later)"),
    "pcie_gbps": (1e-9, MAX_PCIE_GBPS, f"a positive number of GB/s, at most {MAX_PCIE_GBPS:g}"),
    "cpu_gflops": (1e-9, MAX_CPU_GFLOPS, f"a positive number of GFLOP/s, at most {MAX_CPU_GFLOPS:g}"),
}


def _profile_problem(path: Path) -> str | None:
    """What keeps `path` from being a routing profile (scripts/record_routing.py's JSON), or None."""
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            return f"{size} bytes, at most {MAX_PROFILE_BYTES}"
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"not UTF-8 JSON: {_show(str(e) or type(e).__name__)}"
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        return f"expected a JSON object with \"format\": {PROFILE_FORMAT!r}"
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        return "expected \"layers\": {\"L\": [count per expert], ...}"
    for layer, counts in layers.items():
        if not isinstance(counts, list) or not all(_is_number(c) and c >= 0 for c in counts):
            return f"layer {_show(layer)}: expected a list of counts >= 0"
    return None


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
        try:  # a plain scalar can still fail: 2001-13-45 (a date), a 5000-digit int, an unknown !!tag
            return self.constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as e:
            problem = getattr(e, "problem", None) or e
            raise self.fail(node, f"{what}: cannot read {_show(node.value)} ({problem}); quote it if it "
                                  f"is text") from None

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
                raise self.fail(match["kind"], f"unknown kind {_show(kind)}; expected one of {', '.join(KINDS)}")
        name = self.pattern(match["name"]) if "name" in match else None
        return Rule(name, kind, self.place(parts["place"], "place", kind), node.start_mark.line + 1, self.source)

    def pattern(self, node: yaml.Node) -> regex.Pattern:
        """A `name` regex, refused before compiling when it is long or its repeats multiply out large
        (regex expands (?:a{n}){m} to n*m copies: gigabytes); matched with a timeout (Rule.matches)."""
        pattern = self.scalar(node, "name")
        if not isinstance(pattern, str) or not pattern:
            raise self.fail(node, f"name must be a regex of module paths (quoted text), found {_show(pattern)}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise self.fail(node, f"the name pattern is {len(pattern)} characters, at most {MAX_PATTERN_CHARS}; "
                                  f"match by kind, or use several rules")
        cost = _repeat_cost(pattern)
        if cost > MAX_REPEAT_COST:
            raise self.fail(node, f"the name pattern {_show(pattern)} repeats {cost} times when its {{n}} counts "
                                  f"are multiplied out, at most {MAX_REPEAT_COST}; use + or * instead")
        try:
            return regex.compile(pattern)
        except (regex.error, RecursionError, OverflowError, MemoryError) as e:
            raise self.fail(node, f"invalid regex {_show(pattern)}: {e or type(e).__name__}") from None

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
        if key == "cache":
            return self.cache(value, node)
        if key == "policy":
            if value not in POLICIES:
                raise self.fail(node, f"unknown cache policy {_show(value)}; expected one of {', '.join(POLICIES)}")
            return {key: value}
        if key == "profile":
            return {key: self.profile(value, node)}
        if key in ("prefetch", "overlap", "stream"):
            if not isinstance(value, bool):
                raise self.fail(node, f"hetero.{key} must be true or false, found {_show(value)}")
            return {key: value}
        lo, hi, what = _HETERO_NUMBERS[key]
        if not _is_number(value) or not lo <= value <= hi or (key == "defer" and not isinstance(value, int)):
            raise self.fail(node, f"hetero.{key} must be {what}, found {_show(value)}")
        return {key: value if key == "defer" else float(value)}

    def cache(self, value: Any, node: yaml.Node) -> dict[str, int]:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CACHE_SLOTS:
            return {"cache_slots": value}
        if isinstance(value, str):
            try:
                nbytes = parse_bytes(value, "hetero.cache")
            except (HeteroRTError, OverflowError) as e:  # OverflowError: 1e400 of a unit is inf bytes
                raise self.fail(node, str(e) if isinstance(e, HeteroRTError) else
                                f"hetero.cache: {_show(value)} is not a size") from None
            if nbytes <= MAX_CACHE_BYTES:
                return {"cache_bytes": nbytes}
        raise self.fail(node, f"hetero.cache must be a number of expert slots (0 to {MAX_CACHE_SLOTS}) or a size "
                              f"(e.g. 2GiB, at most 1 PiB), found {_show(value)}")

    def profile(self, value: Any, node: yaml.Node) -> str:
        """The routing profile's path (relative to the rules file), once it reads as one: a JSON object
        of PROFILE_FORMAT whose layers are lists of counts (experts/hetero/builder.load_profile
        checks a layer's counts against the model at load)."""
        if not isinstance(value, str) or not value:
            raise self.fail(node, f"hetero.profile must be a file path, found {_show(value)}")
        path = Path(value)
        if not path.is_absolute() and Path(self.source).is_file():
            path = Path(self.source).parent / path
        try:
            found = path.is_file()  # False for a NUL in the name
        except OSError:             # a name too long for the file system
            found = False
        if not found:
            raise self.fail(node, f"routing profile {_show(str(path))} not found (or not a file); record one "
                                  f"with scripts/record_routing.py")
        problem = _profile_problem(path)
        if problem:
            raise self.fail(node, f"{path} is not a routing profile ({problem}); record one with "
                                  f"scripts/record_routing.py")
        return str(path)

    def check(self, key: str, value: Any, node: yaml.Node, kind: str | None) -> Any:
        if key == "device":
            if not isinstance(value, str) or not _DEVICE.match(value):
                raise self.fail(node, f"unknown device {_show(value)}; expected cpu, cuda or cuda:N")
        elif key == "dtype":
            if value not in DTYPES:
                raise self.fail(node, f"unknown dtype {_show(value)}; expected one of {', '.join(DTYPES)}")
        elif key == "format":
            if value not in FORMATS:
                raise self.fail(node, f"unknown format {_show(value)}; expected one of {', '.join(FORMATS)}")
            if value != "dtype" and kind is not None and kind not in FORMAT_KINDS[value]:
                raise self.fail(node, f"format {_show(value)} is available for {', '.join(FORMAT_KINDS[value])}, "
                                      f"not {kind}")
        elif key == "backend":
            allowed = sorted(registry.names())
            if value not in allowed:
                raise self.fail(node, f"unknown backend {_show(value)}; expected one of {', '.join(allowed)}")
            if kind is not None and kind not in BACKEND_KINDS:
                raise self.fail(node, f"backend {_show(value)} cannot run kind {kind!r}; only "
                                      f"{', '.join(BACKEND_KINDS)} has a choice of backend")
        elif key == "threads":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_THREADS:
                raise self.fail(node, f"threads must be a positive integer (at most {MAX_THREADS}), found "
                                      f"{_show(value)}")
        elif key == "activations":
            if value not in ACTIVATIONS:
                raise self.fail(node, f"unknown activations {_show(value)}; expected one of {', '.join(ACTIVATIONS)}")
            if kind is not None and kind != "routed_experts" and kind not in FORMAT_KINDS["stored"]:
                raise self.fail(node, f"activations is a setting of the CPU kernels (routed_experts on numba/hetero, "
                                      f"format: stored weights of {', '.join(FORMAT_KINDS['stored'])}), not {kind}")
        return value

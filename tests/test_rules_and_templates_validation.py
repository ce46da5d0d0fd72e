"""Hostile and broken input to the placement rules, the chat template and the tokenizer files: each
ends in a HeteroRTError naming the file (and line, rule or template), or in a valid result, and soon.
Seeded mutation fuzzers over the shipped rules files, random jinja templates and tokenizer_config.json
(~20 s each; with --runslow ten times as many), every case under a hang guard and a memory guard."""
import json
import random
import re
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend
from tokenizers import models

from fuzz_guard import time_limit
from hetero_rt.checkpoint.tokenizer import TemplateLimitError, TemplateLimits, Tokenizer
from hetero_rt.checkpoint.tokenizer_builder import BOS, CHAT_TEMPLATE, EOS, build_tokenizer
from hetero_rt.config import ModelArgs
from hetero_rt.errors import CheckpointError, HeteroRTError, InputError
from hetero_rt.experts.hetero.builder import PROFILE_FORMAT
from hetero_rt.placement.plan import resolve
from hetero_rt.placement.schema import HETERO_KEYS, PLACE_KEYS, PlacementError, load_rules, parse_rules

ROOT = Path(__file__).parent.parent
V3 = Path(__file__).parent / "fixtures" / "deepseek_v3" / "config.json"
SHIPPED = sorted((ROOT / "placement_rules").glob("*.yaml"))
ROUTED = "rules:\n  - match: {kind: routed_experts}\n    place: {backend: hetero, hetero: {%s}}\n"
GUARD_S = 60          # a case that takes this long hangs: the limits under test are far smaller
FAST = TemplateLimits(seconds=0.5)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "café 漢字?"}]


def guard(seconds: float = GUARD_S):
    """Fail (CaseTimeout) instead of hanging CI."""
    return time_limit(seconds)


@contextmanager
def memory_guard(extra_bytes: int = 4 << 30):
    """An address-space cap a few GiB above what the process maps now: a case that would allocate
    gigabytes gets a MemoryError (seen as the cause of its error) instead of the OOM killer."""
    status = Path("/proc/self/status").read_text().splitlines()
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def outcome(run) -> str:
    """'valid', or the class of the HeteroRTError it ended in (not caused by a MemoryError); anything
    else fails the test."""
    try:
        with guard():
            run()
        return "valid"
    except HeteroRTError as e:
        assert not isinstance(e.__context__, MemoryError), f"ran out of memory: {e}"
        return type(e).__name__


@pytest.fixture(scope="module")
def v3_args():
    return ModelArgs.from_config_file(V3)


def rules_error(text: str, source: str = "r.yaml") -> str:
    with guard(), pytest.raises(PlacementError) as e:
        parse_rules(text, source)
    return str(e.value)


# ---- A. placement rules ----

def test_rules_file_size_encoding_and_nesting(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("rules: []\n" + "#" * (1 << 20))
    with pytest.raises(PlacementError, match=r"big.yaml: \d+ bytes is not a placement file \(at most 1048576"):
        load_rules(big)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"defaults: {device: cpu}\nrules:\n  - match: {kind: gate} # caf\xe9\n")
    with pytest.raises(PlacementError, match="latin1.yaml:3: not UTF-8 text"):
        load_rules(bad)
    assert "r.yaml: nested too deeply (more than 20 levels) at line 2" in rules_error(
        "rules:\n  " + "[" * 100_000 + "]" * 100_000 + "\n")
    block = "rules:\n" + "".join("  " * i + "- x:\n" for i in range(1, 40))
    assert "r.yaml: nested too deeply" in rules_error(block)


def test_billion_laughs_and_too_many_nodes():
    """yaml's composer shares an aliased node instead of copying it, and our reader walks a fixed shape,
    so nine levels of ten-fold aliases cost nine nodes; aliases for a shared place still work."""
    laughs = "rules: [\n  &a [x, x, x, x, x, x, x, x, x, x],\n" + "".join(
        f"  &{c} [{', '.join([f'*{p}'] * 10)}],\n" for p, c in zip("abcdefgh", "bcdefghi")) + "]\n"
    assert "r.yaml:2: a rule must be a mapping with keys match, place" in rules_error(laughs)
    many = "rules: [" + ", ".join(["x"] * 30_000) + "]\n"
    assert "r.yaml: too many values (more than 20000 YAML nodes) at line 1" in rules_error(many)
    shared = ("defaults: &d {device: cpu}\nrules:\n  - match: {kind: gate}\n    place: *d\n"
              "  - match: {kind: norm}\n    place: *d\n")
    assert [r.place.device for r in parse_rules(shared, "r.yaml").rules] == ["cpu", "cpu"]


@pytest.mark.parametrize("value, message", [
    ("2001-13-45", r"r.yaml:3: device: cannot read '2001-13-45' \(month must be in 1..12\)"),
    ("!!python/object:os.system x", "r.yaml:3: device: cannot read 'x' .*could not determine a constructor"),
    ("9" * 5000, r"r.yaml:3: device: cannot read '999.*Exceeds the limit \(4300 digits\)"),
])
def test_scalars_yaml_cannot_build(value, message):
    assert re.search(message, rules_error(f"rules:\n  - match: {{kind: gate}}\n    place: {{device: {value}}}\n"))


def test_name_patterns_that_backtrack_are_refused_not_hung(v3_args):
    rules = parse_rules("rules:\n  - match: {name: '(.|..)*x'}\n    place: {device: cpu}\n", "r.yaml")
    with guard(), pytest.raises(PlacementError, match=r"r.yaml:2: the name pattern '\(.\|..\)\*x' backtracked "
                                                      r"for more than 0.5 s on 'model.layers.3.mlp.experts.gate"):
        rules.rules[0].matches("model.layers.3.mlp.experts.gate_proj.weight_scale_inv", "routed_experts")
    # regex answers (a+)+$, the textbook case, without backtracking: no match, quickly
    rules = parse_rules("rules:\n  - match: {name: '(a+)+$'}\n    place: {device: cpu}\n", "r.yaml")
    with guard(10):
        assert not rules.rules[0].matches("model.layers.3." + "a" * 5000 + "!", "routed_experts")


@pytest.mark.parametrize("pattern, message", [
    ("x" * 5000, "r.yaml:2: the name pattern is 5000 characters, at most 4096"),
    ("(?:a{60000}){60000}", r"r.yaml:2: the name pattern '\(\?:a\{60000\}\)\{60000\}' repeats 3600120000 times"),
    ("(?:(?:(?:a{100}){100}){100})", r"repeats 10\d{5} times when its \{n\} counts are multiplied out"),
    ("(" * 2000 + ")" * 2000, "r.yaml:2: invalid regex"),
    ("model.layers.(3", "r.yaml:2: invalid regex 'model.layers.\\(3'"),
])
def test_name_patterns_too_long_or_too_large_to_compile(pattern, message):
    """regex compiles (?:a{m}){n} by copying, m*n atoms: gigabytes before any timeout could act."""
    assert re.search(message, rules_error(f"rules:\n  - match: {{name: '{pattern}'}}\n    place: {{device: cpu}}\n"))


@pytest.mark.parametrize("name", ["5", "~", "[a]"])
def test_name_must_be_a_pattern(name):
    assert "r.yaml:2: name must be" in rules_error(f"rules:\n  - match: {{name: {name}}}\n    place: {{device: cpu}}\n")


@pytest.mark.parametrize("hetero, message", [
    ("decay: .nan", r"hetero.decay must be a number in \(0, 1\], found nan"),
    ("decay: -0.5", r"hetero.decay must be a number in \(0, 1\], found -0.5"),
    ("decay: true", "hetero.decay must be a number in .*, found True"),
    ("pcie_gbps: -.inf", "hetero.pcie_gbps must be a positive number of GB/s, at most 10000, found -inf"),
    ("pcie_gbps: 1.0e+400", "hetero.pcie_gbps must be .* found inf"),
    ("cpu_gflops: " + "9" * 400, r"hetero.cpu_gflops must be .*, found 9999.*\.\.\."),
    ("defer: 1.5", "hetero.defer must be an integer from 0 to 1024"),
    ("defer: " + "9" * 400, "hetero.defer must be an integer from 0 to 1024"),
    ("defer: false", "hetero.defer must be an integer .* found False"),
    ("cache: -1", r"hetero.cache must be a number of expert slots \(0 to 65536\)"),
    ("cache: " + "9" * 30, "hetero.cache must be a number of expert slots"),
    ("cache: true", "hetero.cache must be .* found True"),
    ("cache: " + "9" * 400 + "GiB", "hetero.cache: '9999.* is not a size"),
    ("cache: 2000TiB", "hetero.cache must be .* at most 1 PiB"),
    ("prefetch: 1", "hetero.prefetch must be true or false, found 1"),
])
def test_absurd_hetero_numbers(hetero, message):
    assert re.search("r.yaml:3: " + message, rules_error(ROUTED % hetero))


@pytest.mark.parametrize("content, message", [
    (None, r"routing profile '.*missing.json' not found \(or not a file\)"),
    (b"{not json", r"/profile.json is not a routing profile \(not UTF-8 JSON: 'Expecting property name"),
    (b"\xff\xfe{}", r"is not a routing profile \(not UTF-8 JSON: .*can't decode byte 0xff"),
    (b"[" * 100_000, r"is not a routing profile \(not UTF-8 JSON"),
    (b"[1, 2]", "is not a routing profile \\(expected a JSON object with \"format\": 'hetero_rt.routing_profile/1'"),
    (json.dumps({"format": PROFILE_FORMAT, "layers": [1]}).encode(), r"expected \"layers\": \{\"L\""),
    (json.dumps({"format": PROFILE_FORMAT, "layers": {"3": [1, -2]}}).encode(),
     "layer '3': expected a list of counts >= 0"),
    (json.dumps({"format": PROFILE_FORMAT, "layers": {"3": "hot"}}).encode(), "layer '3': expected a list"),
])
def test_profile_that_is_not_a_routing_profile(tmp_path, content, message):
    name = "missing.json" if content is None else "profile.json"
    if content is not None:
        (tmp_path / name).write_bytes(content)
    rules = tmp_path / "r.yaml"
    rules.write_text(ROUTED % f"cache: 4, policy: static, prefetch: false, profile: {name}")
    with guard(), pytest.raises(PlacementError, match=f"r.yaml:3: .*{message}.*record one with scripts/record_rout"):
        load_rules(rules)


def test_a_routing_profile_is_accepted_relative_to_the_rules_file(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"format": PROFILE_FORMAT, "layers": {"1": [3, 0, 2.5]}}))
    (tmp_path / "r.yaml").write_text(ROUTED % "cache: 4, policy: static, prefetch: false, profile: p.json")
    assert load_rules(tmp_path / "r.yaml").rules[0].place.hetero.profile == str(tmp_path / "p.json")


# ---- B. chat templates ----

def tokenizer(template, source="ckpt") -> Tokenizer:
    backend = Backend(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return Tokenizer(backend, BOS, [EOS], True, template, source=source)


def template_error(template: str, limits: TemplateLimits = FAST) -> str:
    with guard(), pytest.raises(TemplateLimitError) as e:
        tokenizer(template).apply_chat_template(MESSAGES, limits=limits)
    assert str(e.value).startswith("ckpt: chat_template: the template ")
    return str(e.value)


def test_loops_that_print_nothing_stop_at_the_time_limit():
    loops = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    assert "ran for more than 0.5 s" in template_error(loops)
    over = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    assert "asked for range() of 100000 items (at most 10000)" in template_error(over, TemplateLimits())


@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 10**10 }}", "would make or pass on a value of 10000000000 characters"),
    ("{{ 'x' * 1000 * 1000 * 1000 }}", "value of 1000000000 characters"),
    ("{{ [[1, 2]] * 10**9 }}", r"value of \d{11} characters"),
    ("{{ 7 ** (10**9) }}", "value of 3000000000 characters"),   # an int counts its bits
    ("{{ 'x'|center(10**10) }}", "value of 10000000000 characters"),
    ("{{ 'x'.zfill(10**10) }}", "value of 10000000000 characters"),
    ("{{ (1).to_bytes(10**10, 'big') }}", "value of 10000000000 characters"),
    ("{{ ('\n' * 999999)|indent(999999) }}", "value of 999999999999 characters"),
    ("{% set s = 'x' * 999999 %}{{ s|replace('', s) }}", "value of 999999999999 characters"),
    ("{% set s = 'x' * 2000 %}{{ s.translate({120: s}) }}", "value of 4000000 characters"),
    ("{% set s = 'x' * 999999 %}{{ range(1000)|map('string')|join(s) }}", r"value of 999\d{6} characters"),
    ("{{ '%0100000000d' % 1 }}", r"value of 1000000\d\d characters"),
    ("{{ '%0100000000d'|format(1) }}", r"value of 1000000\d\d characters"),
    ("{{ '{:>100000000}'.format(1) }}", "value of 100000000 characters"),
    ("{{ [1]|batch(10**10, 0)|list }}", "value of 10000000000 characters"),
    ("{{ messages|tojson(indent=10**8) }}", "value of 1000000.. characters"),
    ("{% set s = 'x' * 99999 %}{{ ('{0}' * 1000).format(s) }}", r"computed more than 20000000 characters in all"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "value of 1048576 characters"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
     "value of 100000. characters"),  # a list holding one list 2**60 times over, measured in 10**6 steps
    ("{% set s = 'x' * 999999 %}{% macro m() %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endmacro %}"
     + "{{ m()|length }}", "computed more than 20000000 characters in all"),
    ("{% set s = 'x' * 999999 %}{% set b %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endset %}",
     "computed more than 20000000 characters in all"),
])
def test_values_too_large_are_refused_before_they_are_made(template, message):
    """Each of these would allocate gigabytes (or 2**60 list slots printed) in one C call."""
    with memory_guard():
        assert re.search(message, template_error(template, TemplateLimits()))


def test_output_and_source_limits():
    printing = "{% for i in range(10000) %}{{ 'x' * 100 }}{% endfor %}"
    assert "printed more than 50000 characters" in template_error(printing, TemplateLimits(chars=50_000))
    assert "is 50001 characters long (at most 50000)" in template_error("x" * 50_001, TemplateLimits())


METERED_FEATURES = """{% set ns = namespace(system='', n=0) %}
{% macro show(m) %}[{{ m['role'] }}] {{ m['content'] | trim }}{% endmacro %}
{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] %}{% endif %}{% endfor %}
{{ bos_token }}{{ ns.system }}
{% for m in messages if m['role'] != 'system' %}{{ loop.index }}/{{ loop.length }} {{ show(m) }}{% if loop.last %}!{% endif %}
{% endfor %}
{{ messages | map(attribute='role') | join(',') }} {{ '%s=%03d' % ('n', messages|length) }} {{ '{}:{:>4}'.format('a', 7) }}
{{ messages[-1] | tojson }} {{ (messages|length) * 2 }} {{ 'ab' * 3 }} {{ [1, [2, 3]] | tojson(indent=2) }}
{% for x in [[1, [2]], 3] recursive %}{% if x is iterable %}({{ loop(x) }}){% else %}{{ x }}{% endif %}{% endfor %}
{{ 'line1\nline2' | indent(2) }} {{ 'x'.center(7) }} {{ 'a-b'.replace('-', '+') }} {{ 2 ** 10 }}
{% set block %}{{ eos_token }}{% endset %}{{ block | length }}{{ range(3) | list }}{{ dict(a=1) }}"""


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, METERED_FEATURES])
def test_metering_renders_what_jinja_renders(template):
    """The metered sandbox renders real templates exactly as transformers' plain one does."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    chat = MESSAGES * 50
    want = env.from_string(template).render(messages=chat, add_generation_prompt=True, tools=None, documents=None,
                                             bos_token=BOS, eos_token=EOS)
    assert tokenizer(template).apply_chat_template(chat) == want


def test_template_errors_name_the_config_file(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template="{{ 'x' * 10**10 }}")))
    with guard(), pytest.raises(TemplateLimitError, match=r"tokenizer_config.json: chat_template: the template "
                                                          r"would make .* run without --chat"):
        Tokenizer.from_dir(tok_dir).apply_chat_template(MESSAGES)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template="{{ lipsum(10**8) }}")))
    with pytest.raises(InputError, match="tokenizer_config.json: chat_template: failed to render: 'lipsum' is undefined"):
        Tokenizer.from_dir(tok_dir).apply_chat_template(MESSAGES)


# ---- B. tokenizer files ----

@pytest.fixture(scope="module")
def good_tokenizer_json(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("good")
    build_tokenizer(d, vocab_size=300)
    return (d / "tokenizer.json").read_bytes()


@pytest.fixture
def tok_dir(tmp_path, good_tokenizer_json):
    (tmp_path / "tokenizer.json").write_bytes(good_tokenizer_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    return tmp_path


CONFIG = {"bos_token": BOS, "eos_token": {"content": EOS}, "add_bos_token": True, "chat_template": CHAT_TEMPLATE}


@pytest.mark.parametrize("content, message", [
    (b"{\"bos_token\": \"caf\xe9\"}", r"tokenizer_config.json: not valid JSON \(.*can't decode byte 0xe9"),
    (b"{ broken", r"tokenizer_config.json: not valid JSON \('Expecting property name"),
    (b"[" * 100_000, r"tokenizer_config.json: not valid JSON \('maximum recursion depth"),
    (b"{\"model_max_length\": " + b"9" * 5000 + b"}", r"tokenizer_config.json: not valid JSON \('Exceeds the limit"),
    (b"[1, 2]", "tokenizer_config.json: expected a JSON object"),
    ({"chat_template": 5}, "tokenizer_config.json: 'chat_template' must be a string or a list of .* found 5"),
    ({"chat_template": [1]}, "'chat_template' must be a string or a list of .* found \\[1\\]"),
    ({"chat_template": [{"name": "default", "template": 5}]}, "'chat_template' must be a string or a list of"),
    ({"bos_token": 5}, "tokenizer_config.json: 'bos_token' must be a token's text or .* found 5"),
    ({"eos_token": {"content": ["</s>"]}}, "'eos_token' must be a token's text"),
    ({"eos_token": ["</s>"]}, "'eos_token' must be a token's text"),
    ({"add_bos_token": "yes"}, "tokenizer_config.json: 'add_bos_token' must be true or false, found 'yes'"),
    ({"bos_token": "<s>\ud800"}, r"tokenizer_config.json: 'bos_token' holds '\\ud800' at character 3, half of a UTF-16"),
    ({"chat_template": "{{ x }}\udfff"}, "tokenizer_config.json: 'chat_template' holds '\\\\udfff' at character 7"),
])
def test_malformed_tokenizer_config(tok_dir, content, message):
    path = tok_dir / "tokenizer_config.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(dict(CONFIG, **content)).encode())
    with guard(), pytest.raises(CheckpointError, match=message):
        Tokenizer.from_dir(tok_dir)


@pytest.mark.parametrize("eos", ["1", [1, "x"], True, -1, {"id": 1}])
def test_malformed_generation_config(tok_dir, eos):
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(CheckpointError, match="generation_config.json: 'eos_token_id' must be a token id or a list"):
        Tokenizer.from_dir(tok_dir)


@pytest.mark.parametrize("mutate", [
    lambda b: b"\xff\xfe" + b,
    lambda b: b[: len(b) // 2],
    lambda b: b"{\"model\": 5}",
    lambda b: b.replace(b'"type": "BPE"', b'"type": "Nope"', 1),
    lambda b: b.replace(b'"merges": [', b'"merges": [5, ', 1),
])
def test_malformed_tokenizer_json(tok_dir, good_tokenizer_json, mutate):
    (tok_dir / "tokenizer.json").write_bytes(mutate(good_tokenizer_json))
    with guard(), pytest.raises(CheckpointError, match="tokenizer.json: cannot be read as a tokenizers file"):
        Tokenizer.from_dir(tok_dir)


# ---- C. fuzzing ----

def fuzz(name: str, cases, run_case) -> dict[str, int]:
    """Runs every case; prints how many there were, how many ended in a clean error (by class) and how
    many in a valid result."""
    counts, errors = {"valid": 0, "error": 0}, {}
    start = time.monotonic()
    with memory_guard():
        for i, case in enumerate(cases):
            try:
                result = outcome(lambda case=case: run_case(case))
            except BaseException as e:  # the failing case, for a reproducer
                raise AssertionError(f"{name} case {i}: {type(e).__name__}: {e}\n--- case ---\n{case!r:.3000}") from e
            counts["valid" if result == "valid" else "error"] += 1
            if result != "valid":
                errors[result] = errors.get(result, 0) + 1
    print(f"\n{name}: {sum(counts.values())} cases, {counts['error']} clean errors "
          f"({', '.join(f'{k} {v}' for k, v in sorted(errors.items()))}), {counts['valid']} valid "
          f"({time.monotonic() - start:.1f} s)")
    return counts


# placement: mutations of the shipped files
VALUES = ["cpu", "cuda", "cuda:1", "tpu", "", "~", "true", "no", "0", "-1", "1", "16", "4097", "1.5", ".nan", ".inf",
          "-.inf", "1.0e+400", "9" * 30, "9" * 5000, "0x10", "1_000", "2001-12-14", "2001-13-45", "!!binary AAAA",
          "!!python/object:os.system x", "!!str 5", "!!int x", "!!float x", "[a, b]", "{a: 1}", "'quoted'",
          '"\\xff"', "*undefined", "&a x", "2GiB", "1e400GiB", "9" * 400 + "GiB", "static", "dynamic", "bfloat16",
          "float8_e4m3", "stored", "dtype", "numba", "hetero", "torch", "int8", "fp32", "routed_experts", "gate",
          "'(a|aa)+$'", "'(?:a{60000}){60000}'", "'model\\.layers\\.[0-9]+\\.mlp\\.experts'", "'(?R)'", "x" * 5000,
          "[" * 60 + "]" * 60, "p.json", "bad.json", "list.json", "latin1.json", "missing.json", "/nonexistent/p.json",
          ".", "{cache: 4, policy: static, prefetch: false, profile: p.json}", "{cache: 2GiB, decay: .nan}"]
KEYS = list(PLACE_KEYS + HETERO_KEYS) + ["match", "place", "name", "kind", "rules", "defaults", "<<", "devic", "''",
                                         "1", "true", "? [x]"]
PIECES = ["\n", "  ", "- ", ": ", "{", "}", "[", "]", ",", "&a ", "*a", "!!", "%YAML 1.1\n", "---\n", "...\n", "#", "'",
          '"', "|", ">", "\t", "\x00", "\ufeff", "\udcff"]


def mutate_rules(rng: random.Random, text: str) -> bytes:
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.3:
            spots = [m.end() for m in re.finditer(r": ", text)] or [len(text)]
            at = rng.choice(spots)
            end = min([m.start() for m in re.finditer(r"[,}\n]", text[at:])] or [0]) + at
            text = text[:at] + rng.choice(VALUES) + text[end:]
        elif roll < 0.45:
            keys = list(re.finditer(r"\b\w+(?=: )", text))
            if keys:
                k = rng.choice(keys)
                text = text[:k.start()] + rng.choice(KEYS) + text[k.end():]
        elif roll < 0.6:
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(PIECES) * rng.choice([1, 1, 2, 50, 5000]) + text[at:]
        elif roll < 0.7:
            lines = text.split("\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines.insert(i, lines[j]) if rng.random() < 0.5 else lines.pop(i)
            text = "\n".join(lines)
        elif roll < 0.8:
            text += (f"  - match: {{name: {rng.choice(VALUES)}, kind: {rng.choice(VALUES)}}}\n"
                     f"    place: {{{rng.choice(KEYS)}: {rng.choice(VALUES)}, hetero: {{{rng.choice(HETERO_KEYS)}: "
                     f"{rng.choice(VALUES)}}}}}\n")
        elif roll < 0.85:
            text = text[:rng.randrange(len(text) + 1)]
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    for _ in range(rng.choice([0, 0, 0, 1, 3])):   # raw byte flips: UTF-8 errors included
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def rules_cases(n: int, seed: int):
    rng = random.Random(seed)
    texts = [p.read_text() for p in SHIPPED]
    for _ in range(n):
        yield mutate_rules(rng, rng.choice(texts))


def run_rules_case(tmp_path, args):
    def run(data: bytes):
        path = tmp_path / "case.yaml"
        path.write_bytes(data)
        resolve(args, load_rules(path), check_devices=False)
    return run


def profile_files(d: Path) -> None:
    (d / "p.json").write_text(json.dumps({"format": PROFILE_FORMAT, "layers": {str(i): [1.0] * 256 for i in range(61)}}))
    (d / "bad.json").write_text("{")
    (d / "list.json").write_text("[1]")
    (d / "latin1.json").write_bytes(b"\xff")


@pytest.mark.parametrize("n", [pytest.param(6000, id="6000"), pytest.param(60000, id="60000", marks=pytest.mark.slow)])
def test_fuzz_placement_rules(tmp_path, v3_args, n):
    profile_files(tmp_path)
    counts = fuzz("placement YAML", rules_cases(n, seed=13), run_rules_case(tmp_path, v3_args))
    assert counts["error"] and counts["valid"]


# chat templates: random jinja
NUMBERS = ["0", "1", "2", "7", "100", "10000", "10**6", "10**9", "10**10", "-1", "2**40", "999999"]
STRINGS = ["'x'", "'ab\\n'", "'\\t'", "''", "'%s'", "'%0999999999d'", "'{}'", "'{:>999999999}'", "'{0}{0}'",
           "bos_token", "messages[0]['content']", "ns.s"]
FILTERS = ["center({n})", "indent({n})", "replace({s}, {s})", "join({s})", "format({e})", "wordwrap({n})",
           "batch({n}, 0)", "slice({n})", "tojson", "tojson(indent={n})", "list", "string", "length", "sum",
           "map('string')", "trim", "upper", "first", "last", "default({e})", "unique", "sort", "reverse", "int",
           "float", "round({n})", "truncate({n})", "items", "dictsort", "attr('x')", "safe", "e", "pprint",
           "selectattr('role')", "wordcount", "title", "urlize", "xmlattr", "filesizeformat", "count", "abs"]
METHODS = ["center({n})", "ljust({n})", "rjust({n})", "zfill({n})", "replace({s}, {s})", "join({e})",
           "format({e}, {e})", "expandtabs({n})", "split()", "upper()", "translate({{120: {s}}})", "encode()",
           "startswith({s})", "count({s})", "splitlines()", "strip()", "items()", "get({s})", "to_bytes({n}, 'big')"]
OPS = ["*", "**", "+", "%", "~", "-", "//", "/", "==", "in", "and", "or"]


def expr(rng: random.Random, depth: int = 0) -> str:
    roll = rng.random() if depth < 4 else rng.random() * 0.4
    if roll < 0.2:
        return rng.choice(NUMBERS)
    if roll < 0.4:
        return rng.choice(STRINGS + ["messages", "[1, [2]]", "{'a': 1}", f"range({rng.choice(NUMBERS)})",
                                     "ns.l", "loop.index", "undefined_name", "namespace(a=1)", "cycler(1, 2)",
                                     "strftime_now('%Y')", "raise_exception('boom')", "''.__class__", "lipsum(2)"])
    if roll < 0.6:
        return f"({expr(rng, depth + 1)} {rng.choice(OPS)} {expr(rng, depth + 1)})"
    fill = {"n": rng.choice(NUMBERS), "s": rng.choice(STRINGS), "e": expr(rng, depth + 1)}
    # mostly on text, as templates use them (an int has no .center): deeper, not just type errors
    receiver = rng.choice(STRINGS) if rng.random() < 0.6 else expr(rng, depth + 1)
    if roll < 0.8:
        return f"({receiver})|" + rng.choice(FILTERS).format(**fill)
    return f"({receiver})." + rng.choice(METHODS).format(**fill)


def stmt(rng: random.Random, depth: int = 0) -> str:
    def body():
        return "".join(stmt(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    roll = rng.random() if depth < 3 else rng.random() * 0.3
    if roll < 0.25:
        return "{{ " + expr(rng) + " }}"
    if roll < 0.3:
        return rng.choice(["text ", "\n", "{# c #}", "{% raw %}{{{% endraw %}", "{%", "}}", "{{ ", "{% endfor %}",
                           "{% break %}", "{% include 'x' %}", "{% import 'x' as y %}", "{{ self }}"])
    if roll < 0.5:
        return f"{{% for i in {expr(rng)} %}}{body()}{{% endfor %}}"
    if roll < 0.6:
        return f"{{% if {expr(rng)} %}}{body()}{{% else %}}{body()}{{% endif %}}"
    if roll < 0.75:
        return f"{{% set ns.{rng.choice('sl')} = {expr(rng)} %}}"
    if roll < 0.85:
        return (f"{{% macro m(a, n) %}}{body()}{{% if n > 0 %}}{{{{ m({rng.choice(['a ~ a', '[a, a]', 'a * 2', 'a'])}, "
                f"n - 1) }}}}{{% endif %}}{{% endmacro %}}{{{{ m({expr(rng)}, {rng.choice(NUMBERS)}) }}}}")
    if roll < 0.92:
        return f"{{% set b %}}{body()}{{% endset %}}{{{{ b|length }}}}"
    return f"{{% filter upper %}}{body()}{{% endfilter %}}"


def template_cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        yield "{% set ns = namespace(s='x', l=[1]) %}" + "".join(stmt(rng) for _ in range(rng.randint(1, 4)))


def run_template_case(template: str):
    out = tokenizer(template).apply_chat_template(MESSAGES, limits=FAST)
    assert len(out) <= FAST.chars


@pytest.mark.parametrize("n", [pytest.param(2400, id="2400"), pytest.param(24000, id="24000", marks=pytest.mark.slow)])
def test_fuzz_chat_templates(n):
    counts = fuzz("chat templates", template_cases(n, seed=13), run_template_case)
    assert counts["error"] and counts["valid"]


# tokenizer_config.json: mutated values, types and bytes
def json_value(rng: random.Random, depth: int = 0):
    roll = rng.random() if depth < 3 else rng.random() * 0.6
    if roll < 0.1:
        return rng.choice([None, True, False])
    if roll < 0.25:
        return rng.choice([0, 1, -1, 2 ** 63, 10 ** 30, 1.5, float("nan"), float("inf"), -0.0])
    if roll < 0.6:
        return rng.choice([BOS, EOS, "", "x" * 10_000, "{{ bos_token }}", "{% for %}", "\x00\ud800", CHAT_TEMPLATE,
                           "{{ 'x' * 10**10 }}", "{{ messages|tojson }}",
                           "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"])
    if roll < 0.8:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["content", "name", "template", "default", "__type", "lstrip", rng.choice(list(CONFIG))]
    return {rng.choice(keys): json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def mutate_config(rng: random.Random) -> tuple[bytes, bytes | None]:
    cfg = dict(CONFIG)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(CONFIG) + ["model_max_length", "added_tokens_decoder", "tokenizer_class"])
        if rng.random() < 0.2:
            cfg.pop(key, None)
        elif key == "chat_template" and rng.random() < 0.4:
            cfg[key] = rng.choice([[{"name": "default", "template": next(template_cases(1, rng.random()))}],
                                   next(template_cases(1, rng.random()))])
        else:
            cfg[key] = json_value(rng)
    data = bytearray(json.dumps(cfg, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass"))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.05:
        data = data[:rng.randrange(len(data) + 1)]
    gen = json.dumps({"eos_token_id": json_value(rng)}).encode() if rng.random() < 0.2 else None
    return bytes(data), gen


def config_cases(n: int, seed: int, tokenizer_json: bytes):
    rng = random.Random(seed)
    for _ in range(n):
        cfg, gen = mutate_config(rng)
        tok = bytearray(tokenizer_json)
        if rng.random() < 0.1:   # now and then the tokenizer.json itself, flipped or cut
            for _ in range(rng.randint(1, 20)):
                tok[rng.randrange(len(tok))] = rng.randrange(256)
            if rng.random() < 0.3:
                tok = tok[:rng.randrange(len(tok))]
        yield cfg, gen, bytes(tok)


def run_config_case(d: Path):
    def run(case):
        cfg, gen, tok = case
        (d / "tokenizer.json").write_bytes(tok)
        (d / "tokenizer_config.json").write_bytes(cfg)
        (d / "generation_config.json").unlink(missing_ok=True)
        if gen is not None:
            (d / "generation_config.json").write_bytes(gen)
        t = Tokenizer.from_dir(d)
        if t.chat_template:
            t.apply_chat_template(MESSAGES, limits=FAST)
    return run


@pytest.mark.parametrize("n", [pytest.param(6000, id="6000"), pytest.param(60000, id="60000", marks=pytest.mark.slow)])
def test_fuzz_tokenizer_config(tmp_path, good_tokenizer_json, n):
    counts = fuzz("tokenizer_config.json", config_cases(n, 13, good_tokenizer_json), run_config_case(tmp_path))
    assert counts["error"] and counts["valid"]

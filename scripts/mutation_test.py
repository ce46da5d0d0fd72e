"""Mutation testing of the routing and attention math and of the weight decoders (issue 18 item 7);
run by hand, not in CI.

Each mutant is one small AST edit of a source file (an operator swapped, a comparison flipped, a
constant changed, a unary minus or `not` dropped, the two parts of a torch.cat/stack swapped). The
mutants are applied to a temporary copy of the package, never to the working tree; for each, a
focused oracle selection runs in a forked child (torch/transformers pre-imported once in the
parent, hetero_rt imported fresh from the mutated copy) and the mutant is killed (tests fail),
survived (tests pass) or timed out.

    .venv/bin/python scripts/mutation_test.py                      # moe.py and mla.py, default tests
    .venv/bin/python scripts/mutation_test.py --list               # print the mutants, run nothing
    .venv/bin/python scripts/mutation_test.py --only mla.py:58     # mutants on one line (or file)
    .venv/bin/python scripts/mutation_test.py --tests tests/test_math_mutants.py --only moe.py
    .venv/bin/python scripts/mutation_test.py --preset decoders --sample 120   # see DECODERS

Numba kernels are compiled per mutant: before each run the numba cache files of the mutated module
and of every module importing it (transitively, at module level) are deleted from the copy, since
numba's cache checks only the source file of the function it compiled, not the kernels it inlined.
kernels/intrinsics.py is not mutated: its kernels are LLVM IR written as Python strings and
builder calls, which one-operator AST edits do not reach (they make IR that fails to compile, or
change nothing); its IR dots are tested on both code paths against float64 numpy.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["hetero_rt/model/moe.py", "hetero_rt/model/mla.py"]
TESTS = ["tests/test_parity_transformers.py", "tests/test_math_mutants.py",
         "tests/test_batcher.py::test_packed_forward_equals_each_sequence_alone"]

# --preset decoders: the dequantizers (quant/: scope-limited to the decoding functions; the reference
# quantizers are not decoders) and the kernels' scalar decoders, each file with the oracle tests
# that reach it directly (gguf.quants dequantization, float64 numpy), so a mutant compiles only
# the kernels those tests call. (file, scopes or None for all, tests)
_K = "tests/test_kernels_ggml.py::"
DECODERS = [
    ("hetero_rt/quant/ggml.py", ["dequantize"], [_K + "test_decode_tile_matches_gguf", _K + "test_quantize_roundtrip",
                                                  "tests/test_decoders_exact.py"]),
    ("hetero_rt/quant/fp8.py", ["dequantize", "check_scale_shape", "pack", "unpack"],
     ["tests/test_fp8_in_place.py::test_pack_round_trips_the_official_layout",
      "tests/test_safetensors_reader.py::test_fp8_block_dequantization",
      "tests/test_safetensors_reader.py::test_dequantize_rejects_wrong_scale_shape",
      "tests/test_safetensors_reader.py::test_fp8_scale_of_wrong_shape_names_tensor", "tests/test_decoders_exact.py"]),
    ("hetero_rt/kernels/dequant.py", None, [_K + "test_decode_tile_matches_gguf", "tests/test_decoders_exact.py"]),
    ("hetero_rt/kernels/dot.py", None,
     [_K + "test_fused_dot_row_matches_gguf", _K + "test_act_sums_against_numpy",
      _K + "test_dot_row_i8_refuses_a_format_without_int8_dot", "tests/test_decoders_exact.py",
      _K + "test_decode_tile_matches_gguf"]),   # last: it recompiles decode_tile, which inlines dot.py's helpers
    # (test_kernels_ggml.py's tests of the int8 vector dots test kernels/intrinsics.py, not this file)
]

BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
               ast.Pow: ast.Mult, ast.FloorDiv: ast.Mult}
CMP_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//",
          ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
          ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    file: str          # relative to ROOT
    line: int
    start: int         # character offsets of the replaced expression in the file text
    end: int
    new: str           # replacement source
    what: str          # human description
    scope: str         # enclosing Class.function

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, raise statements (error messages), and
    decorators (numba's cache / nogil / fastmath / inline options change speed, not what is computed)."""
    skip: set[int] = set()

    def mark(node):
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            mark(node.body[0])
        if isinstance(node, ast.FunctionDef):
            mark(node.returns)
            for dec in node.decorator_list:
                mark(dec)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                mark(a.annotation)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, (ast.Raise, ast.Assert, ast.ImportFrom, ast.Import)):
            mark(node)
    return skip


def constant_variants(value) -> list:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [1] if value == 0 else [0, value + 1] if value == 1 else [value + 1]
    if isinstance(value, float):
        return [1.0] if value == 0 else [value * 2]
    if value in ("-inf", "inf"):
        return ["inf" if value == "-inf" else "-inf"]
    return []


def variants(node: ast.AST) -> list[tuple[ast.AST, str]]:
    """(mutated copy of node, description) for each mutation of this node itself."""
    out = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
        new = BINOP_SWAPS[type(node.op)]
        out.append((ast.BinOp(node.left, new(), node.right), f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMP_SWAPS:
                m = copy.copy(node)
                new = CMP_SWAPS[type(op)]
                m.ops = node.ops[:i] + [new()] + node.ops[i + 1:]
                out.append((m, f"{SYMBOL[type(op)]} -> {SYMBOL[new]}"))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((ast.BoolOp(new(), node.values), f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        name = {ast.USub: "-", ast.Not: "not ", ast.Invert: "~"}[type(node.op)]
        out.append((node.operand, f"drop unary {name.strip()}"))
    elif isinstance(node, ast.Constant):
        for v in constant_variants(node.value):
            out.append((ast.Constant(v), f"{node.value!r} -> {v!r}"))
    elif isinstance(node, ast.IfExp):
        out.append((ast.IfExp(node.test, node.orelse, node.body), "swap if/else branches"))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("cat", "stack") \
            and node.args and isinstance(node.args[0], ast.Tuple) and len(node.args[0].elts) == 2:
        m = copy.copy(node)
        m.args = [ast.Tuple(node.args[0].elts[::-1], ast.Load())] + node.args[1:]
        out.append((m, f"swap the parts of {node.func.attr}"))
    return out


def line_offsets(text: str) -> list[int]:
    offs, n = [0], 0
    for line in text.splitlines(keepends=True):
        n += len(line.encode())
        offs.append(n)
    return offs


def mutants_of(rel: str) -> list[Mutant]:
    text = (ROOT / rel).read_text()
    raw = text.encode()
    tree = ast.parse(text)
    skip = skipped_nodes(tree)
    offs = line_offsets(text)
    scopes: dict[int, str] = {}
    for top in tree.body:
        for node in ast.walk(top):
            if isinstance(node, ast.FunctionDef):
                prefix = f"{top.name}." if isinstance(top, ast.ClassDef) else ""
                for n in ast.walk(node):
                    scopes[id(n)] = prefix + node.name
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        for mutated, what in variants(node):
            start = offs[node.lineno - 1] + node.col_offset
            end = offs[node.end_lineno - 1] + node.end_col_offset
            new = f"({ast.unparse(mutated)})"
            old_text = raw[start:end].decode()
            out.append(Mutant(rel, node.lineno, start, end, new, f"{what}   [{' '.join(old_text.split())[:60]}]",
                              scopes.get(id(node), "<module>")))
    out.sort(key=lambda m: (m.file, m.start, m.what))
    return out


def apply(raw: bytes, m: Mutant) -> bytes:
    return raw[:m.start] + m.new.encode() + raw[m.end:]


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """Fork; the child imports hetero_rt from workdir and runs pytest. -> (killed|survived|timeout, s)."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:                                                        # child
        try:
            os.chdir(workdir)
            sys.path.insert(0, str(workdir))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            import hetero_rt
            assert hetero_rt.__file__.startswith(str(workdir)), hetero_rt.__file__
            import pytest
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
        except BaseException:  # noqa: BLE001  the child must exit here whatever went wrong: count it killed
            rc = 99
        os._exit(int(rc))
    deadline = t0 + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                return ("survived" if rc == 0 else "killed"), time.time() - t0
            if time.time() > deadline:
                break
            time.sleep(0.05)
    except BaseException:                                              # Ctrl-C: take the child down too
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout", time.time() - t0


def importers(work: Path) -> dict[str, set[str]]:
    """module file -> files of the package that import it at module level, transitively (relative paths)."""
    pkg = work / "hetero_rt"
    direct: dict[str, set[str]] = {}
    for path in pkg.rglob("*.py"):
        rel = str(path.relative_to(work))
        base = path.parent
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                root = base
                for _ in range(node.level - 1):
                    root = root.parent
                mod = root.joinpath(*node.module.split(".")) if node.module else root
                for cand in [mod.with_suffix(".py"), mod / "__init__.py"] + \
                        [mod / f"{a.name}.py" for a in node.names]:
                    if cand.exists():
                        direct.setdefault(str(cand.relative_to(work)), set()).add(rel)
    out = {}
    for f in direct:
        seen, todo = set(), [f]
        while todo:
            for g in direct.get(todo.pop(), ()):
                if g not in seen:
                    seen.add(g)
                    todo.append(g)
        out[f] = seen
    return out


def drop_numba_caches(work: Path, files) -> None:
    """Delete numba's cache files (__pycache__/<module>.*.nbi|nbc) of these source files in the copy."""
    for rel in files:
        src = work / rel
        for c in (src.parent / "__pycache__").glob(f"{src.stem}.*.nb[ic]"):
            c.unlink()


def make_copy() -> Path:
    work = Path(tempfile.mkdtemp(prefix="hetero_rt_mut_"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hetero_rt", work / "hetero_rt", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    return work


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["math", "decoders"], default="math",
                   help="math: moe.py and mla.py (default); decoders: quant/ dequantizers, kernels/dequant.py, "
                        "kernels/dot.py, each with its own oracle tests (--files/--tests override)")
    p.add_argument("--files", nargs="+")
    p.add_argument("--tests", nargs="+")
    p.add_argument("--sample", type=int, help="run a deterministic random sample of this many mutants")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--only", nargs="*", default=[], help="file[:line] filters, e.g. moe.py mla.py:58")
    p.add_argument("--scope", nargs="*", default=[], help="enclosing function names, e.g. Gate.forward")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--list", action="store_true")
    p.add_argument("--json", type=Path, help="write the per-mutant results here")
    a = p.parse_args()

    if a.preset == "decoders" and not a.files:
        plan = [(f, scopes, a.tests or tests) for f, scopes, tests in DECODERS]
    else:
        plan = [(f, None, a.tests or TESTS) for f in (a.files or FILES)]
    tests_of = {f: tests for f, _, tests in plan}
    muts = [m for f, scopes, _ in plan for m in mutants_of(f) if scopes is None or m.scope in scopes]
    if a.only:
        muts = [m for m in muts if any(m.where.endswith(o) or (":" not in o and m.file.endswith(o)) for o in a.only)]
    if a.scope:
        muts = [m for m in muts if m.scope in a.scope]
    if a.sample is not None and a.sample < len(muts):
        import random
        picked = set(random.Random(a.seed).sample(range(len(muts)), a.sample))
        print(f"sampled {a.sample} of {len(muts)} mutants (seed {a.seed})", flush=True)
        muts = [m for i, m in enumerate(muts) if i in picked]
    print(f"{len(muts)} mutants", flush=True)
    if a.list:
        for m in muts:
            print(f"{m.where:32} {m.scope:22} {m.what}")
        return

    sys.dont_write_bytecode = True       # a same-size mutant written in the same second must not hit a stale .pyc
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")   # one thread: no OpenMP pool across fork
    os.environ.pop("NUMBA_CACHE_DIR", None)   # numba's cache beside the copy's sources, where drop_numba_caches looks
    for name in ("numpy", "torch", "pytest", "hypothesis", "transformers.models.deepseek_v2.modeling_deepseek_v2",
                 "transformers.models.deepseek_v3.modeling_deepseek_v3", "numba", "gguf", "safetensors"):
        importlib.import_module(name)    # imported once here, inherited by every forked child
    import torch
    torch.set_num_threads(1)             # and no spinning threads on a shared machine
    work = make_copy()
    deps = importers(work)
    results, t_start = [], time.time()
    try:
        for f in sorted({m.file for m in muts}):       # also fills the numba cache the mutants reuse
            status, secs = run_tests(work, tests_of[f], a.timeout)
            print(f"baseline (no mutant) for {f}: {status} in {secs:.1f}s", flush=True)
            if status != "survived":
                sys.exit("the tests fail without a mutant; fix that first")
        for i, m in enumerate(muts, 1):
            target = work / m.file
            original = target.read_bytes()
            stale = [m.file, *deps.get(m.file, ())]
            try:
                target.write_bytes(apply(original, m))
                drop_numba_caches(work, stale)
                status, secs = run_tests(work, tests_of[m.file], a.timeout)
            finally:
                target.write_bytes(original)
                drop_numba_caches(work, stale)
            results.append({**m.__dict__, "status": status, "seconds": round(secs, 1)})
            print(f"[{i}/{len(muts)}] {status:8} {secs:5.1f}s {m.where:32} {m.scope:22} {m.what}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "survived", "timeout")}
    total = len(results)
    print(f"\n{total} mutants: {counts['killed']} killed, {counts['survived']} survived, {counts['timeout']} timed out;"
          f" score {counts['killed'] / max(total, 1):.1%}; {time.time() - t_start:.0f}s")
    for r in results:
        if r["status"] != "killed":
            print(f"  {r['status']:8} {r['file']}:{r['line']} {r['scope']} {r['what']}")


if __name__ == "__main__":
    main()

"""hetero-rt command line: `run` generates from a checkpoint, `chat` talks to it interactively,
`serve` answers OpenAI- and Ollama-compatible HTTP requests (and a web chat page), `plan` shows where
every module goes, `demo` builds a synthetic DeepSeek-V3-architecture checkpoint once and generates
from it, printing tokens/s, `bench` measures prefill and decode tokens/s llama-bench style."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .api import load, make_plan
from .chat import chat_repl
from .checkpoint.source import default_dtype, open_source
from .checkpoint.synthetic import ensure_demo_checkpoint
from .errors import HeteroRTError
from .experts import registry
from .kernels.threads import default_threads
from .placement.memory import plan_memory
from .placement.sizes import fmt_bytes, machine_budgets, parse_bytes, peak_rss_bytes
from .placement.write import write_rules
from .runtime.engine import print_stream
from .runtime.request import GenerationInterrupted
from .serve.server import serve

DEMO_PROMPT = ("The router reads every token and picks the experts that answer it. Each expert is a small "
               "feed forward layer, and the host memory holds all of them while the device runs the "
               "attention and the shared experts. When the prompt is long the prefill is compute bound, and "
               "when the answer is written one token at a time the decode is bound by how fast the weights "
               "of the chosen experts can be read.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except HeteroRTError as e:
        print(f"hetero-rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:           # outside generation (loading, warm-up): nothing to report
        print("\nhetero-rt: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetero-rt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text from a checkpoint")
    run.add_argument("--model", required=True,
                     help="checkpoint directory (config.json + *.safetensors) or a .gguf file (deepseek2, qwen3moe, "
                          "qwen2moe, glm4moe, llama with experts) "
                          "(for split files, any part), or a Hugging Face model id: org/name, org/name:QUANT "
                          "(e.g. :Q4_K_M) or org/name:FILE.gguf (downloaded into the HF cache, or read from it "
                          "with HF_HUB_OFFLINE=1)")
    run.add_argument("--prompt", required=True)
    run.add_argument("-v", "--verbose", action="store_true",
                     help="end with the per-op breakdown of the prefill and of a decode step (profiled again "
                          "after the run, with hooks around every op)")
    _generation_args(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="talk to a checkpoint: a multi-turn REPL, replies streamed "
                                       "(/reset, /system TEXT, /exit; Ctrl-C stops a reply)")
    chat.add_argument("--model", required=True, help="checkpoint directory or .gguf file (as for run)")
    chat.add_argument("--system", default=None, help="system prompt")
    _generation_args(chat, default_n=512, chat_flag=False)
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="serve a checkpoint over HTTP: OpenAI API (/v1), Ollama API (/api), "
                                       "a web chat page (/), /health and /metrics")
    srv.add_argument("--model", required=True, help="checkpoint directory or .gguf file (as for run)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--parallel", type=int, default=4,
                     help="requests decoded together, each with its own KV-cache slot of --context positions "
                          "(more wait in a queue); also how many conversations the prefix cache keeps")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and /api")
    srv.add_argument("--model-name", default=None, help="the model id clients see (default: the file or "
                                                        "directory name)")
    _generation_args(srv, sampling=False)
    srv.set_defaults(func=cmd_serve)

    plan = sub.add_parser("plan", help="show where every module goes and whether it fits, from metadata only")
    plan.add_argument("--model", required=True, type=Path,
                      help="checkpoint directory: config.json plus *.safetensors (only headers are read), "
                           "tensor_shapes.json.gz, or nothing (shapes derived from config.json, bf16); "
                           "or a .gguf file (headers only)")
    plan.add_argument("--rules", default=None, help="placement YAML (default: everything on the CPU; a GGUF's "
                                                    "weights kept as stored)")
    plan.add_argument("--gpu-mem", default=None, help="GPU memory budget, e.g. 24GiB (default: the GPU's own)")
    plan.add_argument("--host-mem", default=None, help="host RAM budget, e.g. 128GiB (default: this machine's RAM)")
    plan.add_argument("--context", type=int, default=4096, help="KV-cache positions to plan for")
    plan.add_argument("--parallel", type=int, default=1,
                      help="sequences decoded at once (serve --parallel): one KV cache of --context positions each")
    plan.add_argument("--dtype", default=None, help="dtype of the dense part when the rules set none")
    plan.add_argument("--write-rules", type=Path, default=None,
                      help="write a placement that fits --gpu-mem to this YAML file")
    plan.add_argument("--expert-backend", default=registry.CPU_DEFAULT, choices=registry.without_settings(),
                      help="backend written for the routed experts placed on the CPU: " + "; ".join(
                          f"{b}: {registry.get(b).summary}" for b in registry.without_settings()))
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="build (once) a synthetic DeepSeek-V3-style checkpoint and run it")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the synthetic checkpoint is kept (default $HETERO_RT_CACHE or ~/.cache/hetero_rt)")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    _generation_args(demo, default_n=32)
    demo.set_defaults(func=cmd_demo)

    # conflict_handler="resolve": the loading options of _generation_args, with --rules repeatable and
    # -t/--threads a list (they replace the single-valued ones)
    bench = sub.add_parser("bench", conflict_handler="resolve",
                           help="llama-bench-style prefill and decode tokens/s per placement and thread count, "
                                "with the machine, a per-op breakdown and the bytes a decode token reads")
    bench.add_argument("--model", required=True, help="checkpoint directory or .gguf file (as for run)")
    _generation_args(bench, sampling=False)
    bench.add_argument("--rules", action="append", default=None,
                       help="placement YAML; repeat to compare placements (default: the default placement)")
    bench.add_argument("-p", "--prompt-tokens", type=_positive, default=512, help="prefill test: prompt tokens")
    bench.add_argument("-n", "--gen-tokens", type=_positive, default=128, help="decode test: generated tokens")
    bench.add_argument("-t", "--threads", type=_int_list, default=None,
                       help="comma list of CPU thread counts, e.g. 1,2,4 (default: physical cores)")
    bench.add_argument("-r", "--repetitions", type=_positive, default=3, help="timed runs per test")
    bench.add_argument("--bandwidth-probe", type=_size, default="1GiB", help="buffer read for the bandwidth figure")
    bench.add_argument("--json", type=Path, default=None, help="write every figure as one JSON document")
    bench.add_argument("--csv", type=Path, default=None, help="write the table's rows (all repetitions) as CSV")
    bench.add_argument("--plot", type=Path, default=None,
                       help="write PNG charts: tokens/s per configuration, per-op time stacked (needs matplotlib: "
                            "the plot extra)")
    bench.add_argument("--trace", type=Path, default=None,
                       help="write the profiled prefill and decode steps as Chrome/Perfetto trace events (JSON): "
                            "per layer and op, per thread")
    bench.set_defaults(func=cmd_bench)
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _int_list(text: str) -> list[int]:
    return [_positive(part.strip()) for part in text.split(",")]


def _size(text: str) -> int:
    try:
        return parse_bytes(text, "--bandwidth-probe")
    except HeteroRTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _generation_args(p: argparse.ArgumentParser, default_n: int = 64, chat_flag: bool = True,
                     sampling: bool = True) -> None:
    """Loading options (every command that runs a model) and, with sampling, generation options."""
    if sampling:
        p.add_argument("-n", "--max-new-tokens", type=int, default=default_n)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
    if chat_flag and sampling:
        p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--context", type=int, default=None, help="KV-cache positions to preallocate")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: from the checkpoint)")
    p.add_argument("--device", default=None, help="cpu | cuda: the whole model, when no --rules are given")
    p.add_argument("--rules", default=None, help="placement YAML (see placement_rules/ and docs/placement_rules.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the kernels and torch (default: physical cores)")
    p.add_argument("--cpu-fallback", action="store_true",
                   help="map every device in the rules to the CPU (machines without a GPU)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load even when the memory planner says the placement needs more RAM or GPU memory "
                        "than this machine has")


def cmd_run(ns: argparse.Namespace) -> int:
    return _generate(ns, Path(ns.model))


def cmd_chat(ns: argparse.Namespace) -> int:
    rt = _load(ns, Path(ns.model))
    return chat_repl(rt, system=ns.system, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                     top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed)


def cmd_serve(ns: argparse.Namespace) -> int:
    rt = _load(ns, Path(ns.model), parallel=ns.parallel)
    serve(rt, ns.host, ns.port, api_key=ns.api_key, model_name=ns.model_name)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = ensure_demo_checkpoint(ns.cache_dir)
    print(f"[demo] synthetic checkpoint: {path} ({time.perf_counter() - t0:.1f} s to build or find)", file=sys.stderr)
    print("[demo] its weights are random (DeepSeek-V3's architecture at a small size), so the text below is "
          "noise: the tokens/s are the point", file=sys.stderr)
    return _generate(ns, path)


def cmd_bench(ns: argparse.Namespace) -> int:
    # imported here so that run / chat / serve / plan never load hetero_rt.bench (llama.cpp's reference,
    # matplotlib): tests/test_experts_build.py holds the runtime path to that
    from .bench.llama_bench import bench_command
    ns.threads = ns.threads or [default_threads()]
    return bench_command(ns)


def cmd_plan(ns: argparse.Namespace) -> int:
    gpu_mem = None if ns.gpu_mem is None else parse_bytes(ns.gpu_mem, "--gpu-mem")
    host_mem = None if ns.host_mem is None else parse_bytes(ns.host_mem, "--host-mem")
    source = open_source(ns.model)
    args = source.args()
    tensors = source.tensor_meta(args)
    source.close()
    dtype = ns.dtype or default_dtype(tensors)
    if ns.write_rules is not None:
        if gpu_mem is None:
            raise HeteroRTError("--write-rules needs --gpu-mem (the budget the placement must fit)")
        text = write_rules(args, tensors, gpu_mem, ns.context, dtype,
                           ns.expert_backend)
        ns.write_rules.write_text(text)
        print(f"wrote {ns.write_rules}", file=sys.stderr)
        ns.rules = ns.write_rules
    plan = make_plan(args, ns.rules, None, cpu_fallback=False, check_devices=False, in_place=source.in_place,
                     dtype=ns.dtype)
    gpus = {d for d in plan.written_devices if d.startswith("cuda")}
    budgets, said = machine_budgets(({"cpu"} if host_mem is None else set()) | (gpus if gpu_mem is None else set()))
    if gpu_mem is not None:
        budgets.update({d: gpu_mem for d in gpus})
    if host_mem is not None:
        budgets["cpu"] = host_mem
    if ns.parallel < 1:
        raise HeteroRTError(f"--parallel must be at least 1, got {ns.parallel}")
    mem = plan_memory(args, plan, tensors, ns.context, plan.main.dtype or dtype, budgets, slots=ns.parallel)
    print(plan.describe())
    for line in said:
        print(line)
    print(mem.describe())
    return 0 if not mem.over() else 1


def _load(ns: argparse.Namespace, path: Path, parallel: int = 1):
    """Load, set threads and warm up (kernels compiled or loaded, allocator and BLAS/cuBLAS set up, so
    no timing includes them), saying what was loaded and where it went."""
    t0 = time.perf_counter()
    rt = load(path, ns.rules, context=ns.context, dtype=ns.dtype, device=ns.device, cpu_fallback=ns.cpu_fallback,
              check_memory=not ns.skip_memory_check, parallel=parallel)
    print(f"[hetero-rt] loaded {path} in {time.perf_counter() - t0:.1f} s; {rt.plan.summary()}", file=sys.stderr)
    if ns.threads is not None:
        rt.set_threads(ns.threads)
    warm = rt.warmup()
    print(f"[hetero-rt] warm-up {warm:.2f} s", file=sys.stderr)
    return rt


def _generate(ns: argparse.Namespace, path: Path) -> int:
    rt = _load(ns, path)
    try:
        res = rt.generate(ns.prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k,
                          top_p=ns.top_p, seed=ns.seed, chat=ns.chat, stream=print_stream)
    except GenerationInterrupted as stop:
        print()
        res = stop.result
        if res is None:
            print("[hetero-rt] interrupted during the prompt's prefill; nothing generated", file=sys.stderr)
        else:
            print(f"[hetero-rt] interrupted after {len(res.new_ids)} generated tokens; prompt "
                  f"{len(res.prompt_ids)} tokens, prefill {res.prefill_tokens_per_s:.1f} tok/s, decode "
                  f"{res.decode_tokens_per_s:.2f} tok/s", file=sys.stderr)
        return 130
    print()
    print(f"[hetero-rt] prompt {len(res.prompt_ids)} tokens, prefill {res.prefill_tokens_per_s:.1f} tok/s; "
          f"generated {len(res.new_ids)} tokens, decode {res.decode_tokens_per_s:.2f} tok/s; "
          f"stop: {res.stop_reason}", file=sys.stderr)
    print(f"[hetero-rt] time to first token {res.prefill_s * 1e3:.1f} ms; peak RSS {fmt_bytes(peak_rss_bytes())}",
          file=sys.stderr)
    if getattr(ns, "verbose", False):
        _print_breakdown(rt, res)
    return 0


def _print_breakdown(rt, res) -> None:
    # imported here, as in cmd_bench: run without -v never loads hetero_rt.bench
    from .bench import profile
    b = profile.replay(rt, res.prompt_ids, res.new_ids)
    print("\n" + profile.describe(f"[hetero-rt] prefill of {len(res.prompt_ids)} tokens", b["prefill"]),
          file=sys.stderr)
    if b["decode"] is not None:
        print("\n" + profile.describe("[hetero-rt] decode step", b["decode"]), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: aggregate tokens/s of `hetero-rt serve` at 1, 2, 4 concurrent clients and the
second-turn prefill with the prefix cache vs a full re-prefill. Without --model, the synthetic demo
checkpoint. Logic: hetero_rt.bench.serving."""
import argparse
import os

import hetero_rt
from hetero_rt.bench.serving import bench_clients, decode_steps, report, second_turn
from hetero_rt.bench.machine import cpu_info
from hetero_rt.checkpoint.synthetic import ensure_demo_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="checkpoint directory or .gguf (default: the synthetic demo checkpoint)")
    p.add_argument("--rules", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--first-turn", type=int, default=384, help="tokens in the first turn's prompt")
    p.add_argument("--added", type=int, default=24, help="new tokens in the second turn")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--context", type=int, default=1024)
    a = p.parse_args()
    rt = hetero_rt.load(a.model or ensure_demo_checkpoint(), a.rules, context=a.context, parallel=max(a.clients))
    if a.threads:
        rt.set_threads(a.threads)
    rt.warmup()
    runs = bench_clients(rt, tuple(a.clients), a.prompt_len, a.max_tokens, a.rounds)
    steps = decode_steps(rt, tuple(a.clients), 3 * a.rounds)
    cached, full = second_turn(rt, a.first_turn, 8, a.added, a.rounds)
    cpu = cpu_info()
    print(f"CPU: {cpu['name']} (family {cpu['family']} model {cpu['model']}), {os.cpu_count()} logical CPUs, "
          f"threads {a.threads or 'default'}")
    print(report(rt, runs, steps, cached, full, a.prompt_len, a.max_tokens, a.first_turn, a.added))


if __name__ == "__main__":
    main()

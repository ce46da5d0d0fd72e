"""Record a routing-frequency profile (for `hetero: {policy: static, profile: FILE}`) and a routing
trace (for Belady's optimum and policy simulation) by generating from a prompt set.

Prompts: --prompts FILE (one per line: text when the checkpoint has a tokenizer, else space-separated
token ids), or --random N random prompts of --prompt-len tokens. --json adds Belady's hit rate per cache
size on the recording. Logic: hetero_rt.bench.routing, hetero_rt.bench.cache_curve."""
import argparse

import hetero_rt
from hetero_rt.bench import document
from hetero_rt.bench.cache_curve import check_sizes, routing_document
from hetero_rt.bench.routing import random_prompts, record_routing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--rules", help="placement YAML (default: everything on the CPU)")
    p.add_argument("--cpu-fallback", action="store_true")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--random", type=int, default=8, help="random prompts when --prompts is not given")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--profile", required=True, help="output routing profile (JSON)")
    p.add_argument("--trace", help="output routing trace (.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write Belady's hit rate per cache size on the recorded routing as JSON "
                                  "(hetero_rt.bench.document)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="with --json: cache sizes (slots per layer; default 0..E, or a spread for large E)")
    a = p.parse_args()
    rt = hetero_rt.load(a.model, a.rules, cpu_fallback=a.cpu_fallback)
    if a.json and a.sizes is not None:
        check_sizes(a.sizes, rt.args.n_routed_experts, a.model)     # before recording, not after
    if a.prompts:
        lines = [line for line in open(a.prompts, encoding="utf-8").read().splitlines() if line.strip()]
        prompts = [rt.encode(line, chat=False) if rt.tokenizer else [int(t) for t in line.split()] for line in lines]
    else:
        prompts = random_prompts(a.random, a.prompt_len, rt.args.vocab_size, a.seed)
    rec = record_routing(rt, prompts, a.new_tokens)
    rec.save(a.profile, a.trace, model_name=str(a.model))
    if a.json:
        config = {k: v for k, v in vars(a).items() if k not in ("json", "model")}
        document.write(routing_document(rec, a.model, config, a.sizes), a.json)
    print(f"recorded {len(prompts)} prompts: profile {a.profile}" + (f", trace {a.trace}" if a.trace else ""))


if __name__ == "__main__":
    main()

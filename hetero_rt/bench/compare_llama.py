"""hetero_rt and llama.cpp (llama-cpp-python) side by side on the same GGUF, thread count and prompt
(scripts/compare_llama_cpp.py).

Each engine runs in its own process (so peak RSS is its own), both loaded at once: load, one warm-up
token, then `rounds` rounds, each a prefill of `prompt_tokens` tokens (timed) and `gen` greedy decode
steps (timed), the engines taking turns round by round (the one that went first goes second in the
next), so that a machine whose speed drifts (a shared VM's memory bandwidth) weighs on both alike;
the report gives medians over the rounds and the median of the per-round ratios. Last, a forward
over a shorter `agree_tokens` prompt returning logits for every position, from which the parent
reports top-1 agreement and the max |logit difference| (relative to the max |logit|).

The prompt is fixed pseudo-random token ids (seeded) drawn from the ordinary tokens of the vocabulary,
after BOS, identical for both engines. Both compute the lm_head for the last prompt token only.
The workers run this file (runpy, without importing the hetero_rt package: the llama.cpp worker's
peak RSS is llama.cpp's, not torch's), so hetero_rt is imported inside run_hetero only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# python -c this FILE ARGS...: runs FILE as __main__ without putting its folder first on sys.path
_RUN_FILE = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def prompt_ids(n: int, vocab: int, seed: int, bos: int | None) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, min(vocab, 2048), size=n).tolist()  # ordinary tokens, past the specials
    return ([bos] if bos is not None else []) + ids[: n - (bos is not None)]


def last_logits(llm) -> np.ndarray:
    """The logits of the last token evaluated (llama.cpp keeps only those without logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


class _Llama:
    """llama.cpp's side of the protocol (see worker): load, a round, the agreement logits."""

    def __init__(self, ns, prompt):
        import llama_cpp
        import llama_cpp.llama as llama_module

        if not ns.llama_extra_bufts:  # see --no-llama-extra-bufts
            default = llama_cpp.llama_model_default_params

            def params():
                p = default()
                p.use_extra_bufts = False
                return p
            llama_module.llama_cpp.llama_model_default_params = params
        self.ns, self.prompt, self.version = ns, prompt, llama_cpp.__version__
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(ns.model, n_ctx=len(prompt) + ns.gen + 16, n_batch=512, n_ubatch=512,
                                   n_threads=ns.threads, n_threads_batch=ns.threads, logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.llm.eval(prompt[:1])

    def round(self) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.prompt)
        prefill = time.perf_counter() - t0
        tok = int(np.argmax(last_logits(llm)))
        llm.eval([tok])  # first decode step (graph for one token) outside the timing, as for hetero_rt
        tok = int(np.argmax(last_logits(llm)))
        t0 = time.perf_counter()
        for _ in range(self.ns.gen):
            llm.eval([tok])
            tok = int(np.argmax(last_logits(llm)))
        return dict(prefill_s=prefill, decode_s=time.perf_counter() - t0)

    def agree_logits(self, agree) -> np.ndarray:
        import llama_cpp
        del self.llm
        llm = llama_cpp.Llama(self.ns.model, n_ctx=len(agree) + 16, n_threads=self.ns.threads,
                              n_threads_batch=self.ns.threads, logits_all=True, verbose=False)
        llm.eval(agree)
        return np.array(llm.scores[: len(agree)], dtype=np.float32)

    def info(self) -> dict:
        return dict(load_s=self.load_s, version=self.version)


class _Hetero:
    """hetero_rt's side of the protocol (see worker)."""

    def __init__(self, ns, prompt):
        import hetero_rt  # before torch: sets the OpenMP wait policy (hetero_rt/__init__.py)
        import torch

        torch.set_num_threads(ns.threads)                      # for the load as well
        self.ns, self.prompt, self.torch = ns, prompt, torch
        t0 = time.perf_counter()
        self.rt = hetero_rt.load(ns.model, ns.rules, dtype=ns.dtype, context=len(prompt) + ns.gen + 16)
        self.load_s = time.perf_counter() - t0
        self.rt.set_threads(ns.threads)
        self.warmup_s = self.rt.warmup()                       # every kernel compiled or loaded, untimed

    def round(self) -> dict:
        rt, torch, n = self.rt, self.torch, len(self.prompt)
        t0 = time.perf_counter()
        logits = rt.step(torch.tensor(self.prompt), 0, last_only=True)
        prefill = time.perf_counter() - t0
        tok = int(logits[-1].argmax())
        tok = int(rt.step(torch.tensor([tok]), n, last_only=True)[-1].argmax())  # untimed, as for llama.cpp
        t0 = time.perf_counter()
        for i in range(self.ns.gen):
            tok = int(rt.step(torch.tensor([tok]), n + 1 + i, last_only=True)[-1].argmax())
        return dict(prefill_s=prefill, decode_s=time.perf_counter() - t0)

    def agree_logits(self, agree) -> np.ndarray:
        return self.rt.logits(agree)

    def info(self) -> dict:
        return dict(load_s=self.load_s, warmup_s=self.warmup_s)


def worker(ns) -> int:
    """One engine, driven line by line on stdin by the parent (compare): "round" runs one timed round
    and answers ROUND {prefill_s, decode_s}; "agree" saves the agreement logits and answers AGREE;
    "quit" answers RESULT {load_s, peak_rss, ...} and exits. READY once loaded."""
    prompt = json.loads(Path(ns.ids).read_text())
    engine = (_Llama if ns.worker == "llama" else _Hetero)(ns, prompt["prompt"])
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            print("ROUND " + json.dumps(engine.round()), flush=True)
        elif cmd == "agree":
            np.save(ns.ids + f".{ns.worker}.npy", engine.agree_logits(prompt["agree"]))
            print("AGREE", flush=True)
        elif cmd == "quit":
            res = engine.info()
            res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print("RESULT " + json.dumps(res), flush=True)
            return 0
    return 1


def decode_bytes(ck, args) -> int:
    """Stored bytes one decode token reads: every weight once, the routed experts' k/E share, one
    embedding row (the expected value for routing spread evenly over the experts)."""
    total = 0
    for name in ck.names():
        info = ck.info(name)
        if name.endswith("_exps.weight"):
            total += info.nbytes * args.num_experts_per_tok // args.n_routed_experts
        elif name == "token_embd.weight":
            total += info.nbytes // info.shape[0]
        else:
            total += info.nbytes
    return total


def measured_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    from hetero_rt.bench.machine import read_bandwidth
    from hetero_rt.kernels.threads import use_threads

    use_threads(threads)
    return read_bandwidth(np.ones(max(nbytes // 4, 1024), np.float32))


@dataclass(frozen=True)
class Options:
    model: str
    threads: int
    prompt_tokens: int = 512
    gen: int = 32
    agree_tokens: int = 64
    rules: str | None = None     # None: the default placement (a GGUF on the CPU: every weight as stored)
    dtype: str = "float32"
    seed: int = 0
    llama_extra_bufts: bool = True
    json: str | None = None      # also write the JSON document (hetero_rt.bench.document) here
    probe_bytes: int = 1 << 30   # the read-bandwidth probe
    rounds: int = 3              # interleaved rounds of prefill + decode per engine (medians reported)


class _Worker:
    """A worker process (this file, --worker NAME) and the line protocol to it; stderr to a file."""

    def __init__(self, name: str, cmd: list[str], tmp: Path):
        self.name, self.err = name, open(tmp / f"{name}.err", "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ask(self, cmd: str | None, answer: str) -> str:
        """Sends cmd (None: nothing) and returns the payload of the first stdout line starting with answer."""
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(answer):
                return line[len(answer):].strip()
        self.proc.wait()
        self.err.seek(0)
        tail = self.err.read()[-3000:]
        raise RuntimeError(f"the {self.name} worker failed (exit {self.proc.returncode}) waiting for {answer!r}:\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.err.close()


def compare(ns: Options) -> int:
    """Runs both workers, prints the table; returns the exit status (1 when a worker failed, 2 for bad options)."""
    if ns.rounds < 1:
        print(f"compare_llama_cpp: --rounds must be at least 1, got {ns.rounds}", file=sys.stderr)
        return 2
    from hetero_rt.checkpoint.gguf import GGUFCheckpoint
    with GGUFCheckpoint(ns.model) as ck:
        args = ck.args()
        size = sum(f.stat().st_size for f in ck.files)
        token_bytes = decode_bytes(ck, args)
    bandwidth = measured_bandwidth(ns.threads, ns.probe_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.json"
        ids.write_text(json.dumps({"prompt": prompt_ids(ns.prompt_tokens, args.vocab_size, ns.seed, args.bos_token_id),
                                   "agree": prompt_ids(ns.agree_tokens, args.vocab_size, ns.seed + 1, args.bos_token_id)}))
        workers = {}
        try:
            for name in ("llama", "hetero"):
                cmd = [sys.executable, "-c", _RUN_FILE, __file__, ns.model, "--worker", name, "--ids", str(ids),
                       "--threads", str(ns.threads), "--prompt-tokens", str(ns.prompt_tokens), "--gen", str(ns.gen),
                       "--rules", ns.rules or "", "--dtype", ns.dtype] + ([] if ns.llama_extra_bufts else ["--no-llama-extra-bufts"])
                workers[name] = _Worker(name, cmd, Path(tmp))
                workers[name].ask(None, "READY")      # loaded one after the other: load times are their own
            rounds = {"llama": [], "hetero": []}
            for r in range(ns.rounds):
                for name in (("llama", "hetero") if r % 2 == 0 else ("hetero", "llama")):
                    rounds[name].append(json.loads(workers[name].ask("round", "ROUND ")))
            results = {}
            for name, w in workers.items():
                w.ask("agree", "AGREE")
                results[name] = json.loads(w.ask("quit", "RESULT "))
                results[name]["rounds"] = rounds[name]
                results[name]["logits"] = np.load(str(ids) + f".{name}.npy")
        except RuntimeError as e:
            print(f"compare_llama_cpp: {e}", file=sys.stderr)
            return 1
        finally:
            for w in workers.values():
                w.close()
        for r in results.values():
            for key in ("prefill_s", "decode_s"):
                r[key] = float(np.median([x[key] for x in r["rounds"]]))
    a, b = results["hetero"], results["llama"]
    diff = float(np.abs(a["logits"] - b["logits"]).max() / np.abs(b["logits"]).max())
    agree = float((a["logits"].argmax(-1) == b["logits"].argmax(-1)).mean())
    rows = []
    for key, label in (("prefill", f"prefill tok/s ({ns.prompt_tokens} tokens)"), ("decode", f"decode tok/s ({ns.gen} tokens)")):
        n = ns.prompt_tokens if key == "prefill" else ns.gen
        ours, theirs = n / a[f"{key}_s"], n / b[f"{key}_s"]
        rows.append((label, f"{ours:.2f}", f"{theirs:.2f}", f"{round_ratio(a, b, key):.2f}"))
    rows.append(("peak RSS (GiB)", f"{a['peak_rss'] / 2**30:.2f}", f"{b['peak_rss'] / 2**30:.2f}",
                 f"{a['peak_rss'] / b['peak_rss']:.2f}"))
    rows.append(("load s", f"{a['load_s']:.1f}", f"{b['load_s']:.1f}", ""))
    print(f"model {ns.model} ({size / 2**30:.2f} GiB), threads {ns.threads}, llama-cpp-python {b['version']}, "
          f"llama.cpp extra buffer types {'on' if ns.llama_extra_bufts else 'OFF'}; "
          f"hetero_rt rules {ns.rules or 'none (the default placement)'} dtype {ns.dtype}; hetero_rt JIT warm-up {a['warmup_s']:.1f} s (untimed)")
    gbs = [token_bytes * ns.gen / r["decode_s"] / 1e9 for r in (a, b)]
    rows.append(("decode weight GB/s (share of read BW)", f"{gbs[0]:.2f} ({gbs[0] / bandwidth:.0%})",
                 f"{gbs[1]:.2f} ({gbs[1] / bandwidth:.0%})", f"{gbs[0] / gbs[1]:.2f}"))
    print(f"memory read bandwidth measured now ({ns.threads} threads): {bandwidth:.1f} GB/s; weights read per "
          f"decode token (stored bytes, routed experts k/E of theirs, embedding row only): {token_bytes / 1e9:.2f} GB")
    print(f"medians of {ns.rounds} interleaved rounds; ratio: median of the per-round ratios")
    print("| | hetero_rt | llama.cpp | ratio |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"agreement over a {ns.agree_tokens}-token prompt: top-1 {agree * 100:.1f}%, "
          f"max |logit diff| / max |logit| = {diff:.2e}")
    if ns.json is not None:
        write_json(ns, results, bandwidth, token_bytes, size, agree, diff)
    return 0


def round_ratio(a: dict, b: dict, key: str) -> float:
    """Median over the rounds of hetero_rt's rate over llama.cpp's in the same round (key: prefill | decode)."""
    return float(np.median([y[f"{key}_s"] / x[f"{key}_s"] for x, y in zip(a["rounds"], b["rounds"])]))


def write_json(ns: Options, results: dict, bandwidth: float, token_bytes: int, size: int, agree: float,
               diff: float) -> None:
    """One row per engine (tokens/s, GB/s and its share of the read bandwidth, peak RSS, load time);
    the run holds what they share (the file, the logit agreement)."""
    from hetero_rt.bench import document, machine

    rows = []
    for engine, r in (("hetero_rt", results["hetero"]), ("llama.cpp", results["llama"])):
        gbs = token_bytes * ns.gen / r["decode_s"] / 1e9
        rows.append({"run": 0, "engine": engine, "threads": ns.threads,
                     "prefill_tokens": ns.prompt_tokens, "prefill_tokens_per_s": ns.prompt_tokens / r["prefill_s"],
                     "decode_tokens": ns.gen, "decode_tokens_per_s": ns.gen / r["decode_s"],
                     "decode_gb_per_s": gbs, "bandwidth_share": gbs / bandwidth, "peak_rss_bytes": r["peak_rss"],
                     "load_s": r["load_s"]})
    run = {"file_bytes": size, "decode_bytes_per_token": token_bytes, "agree_tokens": ns.agree_tokens,
           "rounds": {e: results[k]["rounds"] for e, k in (("hetero_rt", "hetero"), ("llama.cpp", "llama"))},
           "prefill_ratio": round_ratio(results["hetero"], results["llama"], "prefill"),
           "decode_ratio": round_ratio(results["hetero"], results["llama"], "decode"),
           "top1_agreement": agree, "max_logit_diff_rel": diff, "llama_cpp_version": results["llama"]["version"],
           "hetero_rt_warmup_s": results["hetero"]["warmup_s"], "rules": ns.rules, "dtype": ns.dtype}
    config = {k: v for k, v in vars(ns).items() if k not in ("json", "model")}
    document.write(document.document("compare_llama_cpp", ns.model, config,
                                     machine.machine(ns.threads, ns.probe_bytes, measured=bandwidth), rows, [run]),
                   ns.json)



def _worker_main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one engine of hetero_rt.bench.llama_cpp.compare (internal)")
    p.add_argument("model")
    p.add_argument("--worker", choices=["llama", "hetero"], required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--rules", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--no-llama-extra-bufts", dest="llama_extra_bufts", action="store_false")
    ns = p.parse_args(argv)
    ns.rules = ns.rules or None
    return worker(ns)


if __name__ == "__main__":
    sys.exit(_worker_main())

"""Decode ms per token of one engine alone in its process (no other engine loaded), for alternating
runs against compare_llama_cpp.py's in-process turns (docs/benchmarks.md, 2026-12-02):

    for i in 1 2 3; do for e in hetero llama; do python scripts/solo_decode.py $e MODEL.gguf; done; done

Prompt ids 1..11, 2 untimed tokens, then 16 timed single-token steps, 2 threads."""
import sys
import time

which, path = sys.argv[1], sys.argv[2]
if which == "llama":
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=1024, verbose=False)
    llm.eval(list(range(1, 12)))
    for _ in range(2):
        llm.eval([5])
    t0 = time.perf_counter()
    for _ in range(16):
        llm.eval([5])
elif which == "hetero":
    import torch
    import hetero_rt
    rt = hetero_rt.load(path)
    rt.set_threads(2)
    rt.step(torch.tensor(list(range(1, 12))), 0)
    for p in range(11, 13):
        rt.step(torch.tensor([5]), p)
    t0 = time.perf_counter()
    for p in range(13, 29):
        rt.step(torch.tensor([5]), p)
else:
    sys.exit("usage: solo_decode.py hetero|llama MODEL.gguf")
print(f"{which} ms/token {(time.perf_counter() - t0) / 16 * 1e3:.1f}")

"""PNG charts of a `hetero-rt bench` JSON document (matplotlib, an optional dependency: the `plot`
extra): tokens/s per configuration (rules x threads, pp and tg side by side, the std as error bars)
and the per-op time of a decode step and of the prefill, stacked, one bar per placement; where a run
placed a hetero expert cache, a third chart: Belady's hit rate against cache size on the routing of
its profiled decode steps, with the hit rate the placed cache measured (bench.cache_curve).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import HeteroRTError
from .profile import OPS, OTHER


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HeteroRTError("--plot needs matplotlib: pip install 'hetero_rt[plot]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")                     # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot(doc: dict, path: str | Path) -> None:
    """Write the charts of `doc` into one PNG at path."""
    plt = _pyplot()
    cached = [run for run in doc["runs"] if run.get("expert_cache")]
    fig, axes = plt.subplots(1, 3 if cached else 2, figsize=(19.5 if cached else 13, 5))
    tokens_per_s(axes[0], doc)
    op_time(axes[1], doc)
    if cached:
        hit_rate(axes[2], cached)
    fig.suptitle(f"{Path(doc['model']).name} on {doc['machine']['cpu']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tokens_per_s(ax, doc: dict) -> None:
    configs = sorted({(r["rules"], r["threads"]) for r in doc["rows"]}, key=lambda c: (c[0], c[1]))
    tests = sorted({r["test"] for r in doc["rows"]}, key=lambda t: (not t.startswith("pp"), t))
    width = 0.8 / len(tests)
    for k, test in enumerate(tests):
        rows = {(r["rules"], r["threads"]): r for r in doc["rows"] if r["test"] == test}
        xs = [i + k * width for i in range(len(configs))]
        ax.bar(xs, [rows[c]["mean_tokens_per_s"] for c in configs], width,
               yerr=[rows[c]["std_tokens_per_s"] for c in configs], capsize=3, label=test)
    ax.set_xticks([i + width * (len(tests) - 1) / 2 for i in range(len(configs))],
                  [f"{rules}\n{threads} thr" for rules, threads in configs])
    ax.set_ylabel("tokens/s (mean ± std)")
    ax.set_yscale("log")
    ax.set_title("prefill (pp) and decode (tg) tokens/s")
    ax.legend()


def op_time(ax, doc: dict) -> None:
    bars = [(f"{run['rules']}\n{phase}", {o["op"]: o["ms"] for o in run["breakdown"][phase]["ops"]})
            for run in doc["runs"] for phase in ("decode", "prefill")]
    bottoms = [0.0] * len(bars)
    for op in (*OPS, OTHER):
        ms = [b[op] for _, b in bars]
        ax.bar(range(len(bars)), ms, bottom=bottoms, label=op)
        bottoms = [a + b for a, b in zip(bottoms, ms)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars])
    ax.set_ylabel("ms per step (profiled)")
    ax.set_title("where a step goes")
    ax.legend(fontsize=7)


def hit_rate(ax, runs: list[dict]) -> None:
    """Per run with a cache: the Belady line over cache sizes and the measured point at its size."""
    for run in runs:
        c = run["expert_cache"]
        line, = ax.plot(c["curve"]["slots"], c["curve"]["belady_hit_rate"], marker=".", label=f"{run['rules']}: Belady")
        slots = sorted(set(c["slots_per_layer"].values()))
        x = slots[0] if len(slots) == 1 else sum(slots) / len(slots)
        ax.plot([x], [c["measured"]["hit_rate"]], marker="o", markersize=9, linestyle="none", color=line.get_color(),
                label=f"{run['rules']}: measured ({x:g} slots)")
    ax.set_xlabel("cache slots per layer")
    ax.set_ylabel("hit rate (distinct experts per call)")
    ax.set_ylim(0, 1.05)
    ax.set_title("expert-cache hit rate, profiled decode steps")
    ax.legend(fontsize=7)

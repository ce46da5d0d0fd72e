"""scripts/bench_serve.py's library (hetero_rt.bench.serving) on a tiny checkpoint: every figure is
produced from real requests, the token counts are exact, and the report has every row."""
import pytest

import hetero_rt
from hetero_rt.bench.serving import bench_clients, decode_steps, report, second_turn


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    path = write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")
    return hetero_rt.load(path, dtype="float32", parallel=4, context=256)


def test_serving_benchmark_counts_and_report(rt):
    runs = bench_clients(rt, (1, 2, 4), prompt_len=8, max_tokens=5, rounds=2)
    for c, rs in runs.items():
        assert len(rs) == 2 and all(r.clients == c and 1 <= r.tokens <= 5 * c and r.wall_s > 0 for r in rs)
    steps = decode_steps(rt, (1, 2, 4), rounds=2, context_len=16)
    assert {b: len(t) for b, t in steps.items()} == {1: 2, 2: 2, 4: 2}
    assert all(s.ids == [] for s in rt.batcher.slots)
    cached, full = second_turn(rt, first_len=40, reply=4, added=6, rounds=2)   # asserts reuse and equal tokens
    text = report(rt, runs, steps, cached, full, 8, 5, 40, 6)
    assert text.count("\n| ") == 2 + 6 and "re-prefilled" in text          # two headers, three rows each
    assert rt.batcher.busy_slots == 0

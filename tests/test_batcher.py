"""The batcher (hetero_rt.runtime.batcher): requests decoded together give what each gives alone;
the prefix cache's continuation equals a full recompute; cancellation, Ctrl-C, errors and the queue
leave every slot usable; stop strings cut streamed text exactly where the whole text would be cut.
The oracle is the same model run one request at a time from position 0 (itself checked against
transformers in test_parity_transformers.py and test_generation.py)."""
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hetero_rt
from hetero_rt.model.batch import Segment
from hetero_rt.placement.memory import plan_memory
from hetero_rt.runtime.request import GenerationInterrupted, StopText

PROMPTS = [[0, 7, 19, 3, 55, 21], [0, 4, 4, 90, 12], [0, 33, 2, 61, 18, 40, 9, 77, 5], [0, 88]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


@pytest.fixture(scope="module")
def solo(tiny):
    """Each prompt's greedy ids and full-forward logits, one request at a time on a fresh runtime."""
    rt = hetero_rt.load(tiny, dtype="float32")
    return {tuple(p): rt.generate(p, max_new_tokens=8).new_ids for p in PROMPTS}, rt


def requests(rt, prompts, n=8, **kw):
    return [rt.request(p, max_new_tokens=n, **kw) for p in prompts]


def drain(rt, reqs):
    for r in reqs:
        rt.batcher.submit(r)
    while not all(r.finished for r in reqs):
        rt.batcher.step()


def test_packed_forward_equals_each_sequence_alone(tiny):
    """One forward over a prefill segment and two decode segments in different slots equals the
    three sequences forwarded separately (logits 1e-5)."""
    rt = hetero_rt.load(tiny, dtype="float32", parallel=3)
    a, b, c = PROMPTS[:3]
    ref = [rt.logits(p)[-1] for p in (a, b, c)]
    rt.step(torch.tensor(b[:-1]), 0, slot=1)
    rt.step(torch.tensor(c[:-1]), 0, slot=2)
    tokens = torch.tensor(a + [b[-1], c[-1]])
    segs = [Segment(0, 0, len(a)), Segment(1, len(b) - 1, 1), Segment(2, len(c) - 1, 1)]
    got = rt.forward(tokens, segs)                                       # (3, Vocab)
    np.testing.assert_allclose(got.numpy(), np.stack(ref), rtol=1e-5, atol=1e-5)
    every = rt.forward(torch.tensor([a[-1]]), [Segment(0, len(a) - 1, 1)], last_only=False)
    np.testing.assert_allclose(every[0].numpy(), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parallel", [1, 2, 4])
def test_requests_decoded_together_equal_each_alone(tiny, solo, parallel):
    """Four greedy requests submitted at once, on 1, 2 or 4 slots: each gets exactly its solo ids, and
    with one slot they finish in submission order."""
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32", parallel=parallel)
    order = []
    reqs = [rt.request(p, max_new_tokens=8, on_done=lambda res, i=i: order.append(i)) for i, p in enumerate(PROMPTS)]
    drain(rt, reqs)
    assert [r.result.new_ids for r in reqs] == [want[tuple(p)] for p in PROMPTS]
    assert all(r.result.stop_reason == "length" for r in reqs)
    if parallel == 1:
        assert order == [0, 1, 2, 3]
    assert rt.batcher.busy_slots == 0 and rt.batcher.queue_depth == 0
    assert rt.batcher.counters["generated_tokens"] == 4 * 8


def test_long_prompt_prefilled_in_chunks_beside_decoding(tiny, solo):
    """With a 3-token budget per forward, a 9-token prompt is prefilled over several steps while
    another request decodes, and both still equal their solo runs."""
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32", parallel=2)
    rt.prefill_chunk = 3
    first, second = requests(rt, [PROMPTS[0], PROMPTS[2]])
    rt.batcher.submit(first)
    for _ in range(3):                       # first is decoding before second arrives
        rt.batcher.step()
    assert first.result.new_ids and not first.finished
    drain(rt, [second])
    while not first.finished:
        rt.batcher.step()
    assert first.result.new_ids == want[tuple(PROMPTS[0])]
    assert second.result.new_ids == want[tuple(PROMPTS[2])]
    assert rt.batcher.steps >= 3 + 3        # 9 prompt tokens in chunks of <= 3 minus the decode token


def test_prefix_cache_continuation_equals_full_recompute(tiny):
    """A second request extending the first one's prompt and reply reuses the slot's latents: it
    prefills only the new tokens, its logits equal a full forward from position 0 (fp32, 1e-5), and its
    tokens equal a fresh runtime's."""
    rt = hetero_rt.load(tiny, dtype="float32", parallel=2)
    first = rt.generate(PROMPTS[0], max_new_tokens=6)
    follow = PROMPTS[0] + first.new_ids + [42, 17, 5]
    second = rt.generate(follow, max_new_tokens=6)
    cached = len(PROMPTS[0]) + len(first.new_ids) - 1          # the last sampled token was never forwarded
    assert second.cached_tokens == cached and second.prefilled_tokens == len(follow) - cached
    fresh = hetero_rt.load(tiny, dtype="float32")
    assert second.new_ids == fresh.generate(follow, max_new_tokens=6).new_ids
    # the cached latents themselves: continue from them by hand and compare with a full recompute
    slot = next(i for i, s in enumerate(rt.batcher.slots) if s.ids[:cached] == follow[:cached])
    rest = follow[cached:]
    got = rt.forward(torch.tensor(rest), [Segment(slot, cached, len(rest))], last_only=False)
    np.testing.assert_allclose(got.numpy(), fresh.logits(follow)[cached:], rtol=1e-5, atol=1e-5)


def test_identical_prompt_reuses_all_but_its_last_token(tiny, solo):
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32")
    rt.generate(PROMPTS[2], max_new_tokens=3)
    again = rt.generate(PROMPTS[2], max_new_tokens=8)
    assert again.cached_tokens == len(PROMPTS[2]) - 1 and again.new_ids == want[tuple(PROMPTS[2])]


def test_free_slot_with_the_longest_prefix_is_chosen(tiny):
    """Two conversations on two slots; a follow-up of the second lands in the second's slot, and the
    least recently used slot is taken when no prefix is shared."""
    rt = hetero_rt.load(tiny, dtype="float32", parallel=2)
    a = rt.generate(PROMPTS[0], max_new_tokens=2)
    b = rt.generate(PROMPTS[1], max_new_tokens=2)
    slots = rt.batcher.slots
    slot_a = next(i for i, s in enumerate(slots) if s.ids[:len(PROMPTS[0])] == PROMPTS[0])
    assert slots[1 - slot_a].ids[:len(PROMPTS[1])] == PROMPTS[1]
    rt.generate(PROMPTS[1] + b.new_ids + [3], max_new_tokens=2)
    assert slots[slot_a].ids[:len(PROMPTS[0])] == PROMPTS[0]           # a's conversation kept
    rt.generate([1, 2, 3], max_new_tokens=2)                            # shares nothing: LRU slot (a's)
    assert slots[slot_a].ids[:3] == [1, 2, 3] and a.new_ids


def test_cancel_stops_within_one_token_and_frees_the_slot(tiny, solo):
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32", parallel=1)
    seen = []
    active = rt.request(PROMPTS[0], max_new_tokens=8, on_text=lambda piece: (seen.append(piece), active.cancel()))
    waiting = rt.request(PROMPTS[1], max_new_tokens=8)
    later = rt.request(PROMPTS[3], max_new_tokens=8)
    for r in (active, waiting, later):
        rt.batcher.submit(r)
    waiting.cancel()
    while not later.finished:
        rt.batcher.step()
    assert active.result.stop_reason == "cancelled" and len(active.result.new_ids) == len(seen) == 1
    assert waiting.result.stop_reason == "cancelled" and waiting.result.new_ids == []
    assert later.result.new_ids == want[tuple(PROMPTS[3])] and rt.batcher.busy_slots == 0


def test_ctrl_c_in_a_step_leaves_the_cache_consistent(tiny, solo):
    """Ctrl-C inside a forward: the request ends "interrupted", its slot is free, and the next
    request, sharing its prefix, still gets exactly its solo tokens (no half-written latents reused)."""
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32")
    forward, calls = rt.batcher.forward, [0]

    def flaky(tokens, segments):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return forward(tokens, segments)

    rt.batcher.forward = flaky
    with pytest.raises(GenerationInterrupted) as info:
        rt.generate(PROMPTS[0], max_new_tokens=8)
    assert info.value.result.stop_reason == "interrupted" and len(info.value.result.new_ids) == 3
    assert rt.batcher.busy_slots == 0
    res = rt.generate(PROMPTS[0], max_new_tokens=8)
    assert res.cached_tokens == len(PROMPTS[0]) - 1          # the slot kept prompt + 2 forwarded tokens
    assert res.new_ids == want[tuple(PROMPTS[0])]


def test_a_failing_forward_fails_its_requests_not_the_batcher(tiny, solo):
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32", parallel=2)
    forward, calls = rt.batcher.forward, [0]

    def broken_once(tokens, segments):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("device lost")
        return forward(tokens, segments)

    rt.batcher.forward = broken_once
    reqs = requests(rt, PROMPTS[:2])
    drain(rt, reqs)
    assert [r.result.stop_reason for r in reqs] == ["error", "error"]
    assert all(isinstance(r.error, RuntimeError) for r in reqs)
    with pytest.raises(RuntimeError, match="device lost"):
        rt.batcher.forward = lambda t, s: (_ for _ in ()).throw(RuntimeError("device lost"))
        rt.generate(PROMPTS[0], max_new_tokens=2)
    rt.batcher.forward = forward
    assert rt.generate(PROMPTS[2], max_new_tokens=8).new_ids == want[tuple(PROMPTS[2])]


def test_loop_thread_serves_concurrent_submitters(tiny, solo):
    """The server's mode: a loop thread runs the steps; eight threads submit and wait; each gets its
    own tokens; stop() ends the thread."""
    want, _ = solo
    rt = hetero_rt.load(tiny, dtype="float32", parallel=3)
    rt.batcher.start()
    results = {}

    def client(i):
        p = PROMPTS[i % len(PROMPTS)]
        results[i] = rt.generate(p, max_new_tokens=8).new_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rt.batcher.stop()
    assert rt.batcher._thread is None
    assert results == {i: want[tuple(PROMPTS[i % len(PROMPTS)])] for i in range(8)}


def test_messages_use_the_chat_template(tiny):
    rt = hetero_rt.load(tiny, dtype="float32")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    text = rt.tokenizer.apply_chat_template(msgs)
    assert rt.encode(msgs) == rt.tokenizer.encode(text)
    assert rt.generate(msgs, max_new_tokens=4).new_ids == rt.generate(rt.tokenizer.encode(text), max_new_tokens=4).new_ids
    assert rt.encode("hello", chat=True) == rt.encode([{"role": "user", "content": "hello"}])
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    assert rt.encode(parts) == rt.encode([{"role": "user", "content": "hello"}])


@pytest.mark.parametrize("bad, match", [
    ([{"role": "wizard", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be text"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
    ([{"role": "user"}, "x"], r"messages\[1\] must be a mapping"),
])
def test_bad_messages_are_input_errors(tiny, bad, match):
    rt = hetero_rt.load(tiny, dtype="float32")
    with pytest.raises(hetero_rt.errors.InputError, match=match):
        rt.generate(bad, max_new_tokens=2)


def test_stop_strings_cut_the_text(tiny):
    rt = hetero_rt.load(tiny, dtype="float32")
    full = rt.generate("hello", max_new_tokens=16)
    stop = full.text[5:8]
    assert len(stop) == 3 and stop in full.text
    streamed = []
    cut = rt.generate("hello", max_new_tokens=16, stop=[stop, "\x00never"], stream=streamed.append)
    assert cut.text == full.text[:full.text.index(stop)] == "".join(streamed)
    assert cut.stop_reason == "stop" and len(cut.new_ids) < len(full.new_ids)


@settings(max_examples=300, deadline=None, derandomize=True)   # the same 300 cases in every run
@given(text=st.text(alphabet="abc", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3))
def test_stop_text_streamed_equals_cutting_the_whole_text(text, cuts, stops):
    """However the text is split into pieces, what StopText lets through (then flushes when no stop
    string came) is the text cut where generation would stop: at the first piece that completes a stop
    string, before the earliest stop string in the text so far (a longer one still incomplete there
    never completes: generation has ended)."""
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    seen = next((text[:b] for b in bounds[1:] if any(s in text[:b] for s in stops)), None)
    hits = [seen.find(s) for s in stops if s in seen] if seen is not None else []
    want = text[:min(hits)] if hits else text
    st_, out = StopText(stops), []
    hit = False
    for a, b in zip(bounds, bounds[1:]):
        piece, hit = st_.push(text[a:b])
        out.append(piece)
        if hit:
            break
    if not hit:
        out.append(st_.flush())
    assert "".join(out) == want and hit == bool(hits)


def test_memory_plan_counts_one_kv_cache_per_slot(tiny):
    from hetero_rt.api import make_plan
    from hetero_rt.checkpoint.source import open_source
    src = open_source(tiny)
    args = src.args()
    plan = make_plan(args, None, None, False)
    one, four = (plan_memory(args, plan, src.tensor_meta(args), 64, "float32", slots=n) for n in (1, 4))
    assert four.devices["cpu"].kv_cache == 4 * one.devices["cpu"].kv_cache > 0
    assert "x 4 slots" in four.describe()


def test_plan_and_load_count_parallel_kv_caches(tiny, capsys):
    """`plan --parallel 4` shows four KV caches; load(parallel=4) allocates exactly what it planned."""
    from hetero_rt.cli import main as cli_main
    assert cli_main(["plan", "--model", str(tiny), "--context", "64", "--parallel", "4"]) == 0
    assert "kv cache (64 positions x 4 slots)" in capsys.readouterr().out
    rt = hetero_rt.load(tiny, dtype="float32", context=64, parallel=4)
    assert rt.cache.data.shape == (rt.args.num_hidden_layers, 4, 64, rt.args.latent_cache_width)
    assert cli_main(["plan", "--model", str(tiny), "--parallel", "0"]) == 2

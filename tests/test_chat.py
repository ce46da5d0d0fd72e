"""The chat REPL (hetero_rt.chat): scripted input over a tiny random checkpoint. Multi-turn history
and prefix reuse, the commands, Ctrl-C during a reply and at the prompt, EOF, errors."""
import io

import pytest

import hetero_rt
from hetero_rt.chat import Conversation, chat_repl
from hetero_rt.runtime.request import GenerationInterrupted

N = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


@pytest.fixture(scope="module")
def rt(tiny):
    return hetero_rt.load(tiny)


class Recorder:
    """The runtime, with every generate call's messages and its result (or exception) recorded."""

    def __init__(self, rt):
        self.rt, self.calls, self.results = rt, [], []

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def generate(self, prompt, **kw):
        self.calls.append(prompt)
        try:
            res = self.rt.generate(prompt, **kw)
        except BaseException as e:
            self.results.append(e)
            raise
        self.results.append(res)
        return res


def script(*lines):
    """An input_fn giving the lines, then EOF (Ctrl-D); prompts must be the REPL's."""
    it = iter(lines)

    def input_fn(prompt):
        assert prompt == "> "
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return input_fn


def run(rt, *lines, **kw):
    rec, out, err = Recorder(rt), kw.pop("out", None) or io.StringIO(), io.StringIO()
    rc = chat_repl(rec, input_fn=script(*lines), out=out, err=err, max_new_tokens=N, **kw)
    return rc, rec, out.getvalue(), err.getvalue()


def user(text):
    return {"role": "user", "content": text}


def test_two_turns_reuse_the_prefix_and_match_a_fresh_runtime(rt, tiny):
    rc, rec, out, err = run(rt, "hello there", "and then?")
    assert rc == 0 and len(rec.results) == 2
    first, second = rec.results
    assert rec.calls == [[user("hello there")],
                         [user("hello there"), {"role": "assistant", "content": first.text}, user("and then?")]]
    assert second.cached_tokens >= len(first.prompt_ids)      # turn 1's whole prompt was not prefilled again
    fresh = hetero_rt.load(tiny).generate(rec.calls[1], max_new_tokens=N, temperature=0.0)
    assert fresh.text == second.text and fresh.new_ids == second.new_ids and fresh.cached_tokens == 0
    assert out == f"{first.text}\n{second.text}\n\n"             # each reply streamed, then a newline; EOF
    stats = [line for line in err.splitlines() if "tok/s" in line]
    assert len(stats) == 2
    assert f"{second.cached_tokens} cached" in stats[1] and f"{len(second.new_ids)} tokens generated" in stats[1]
    assert "prefill" in stats[1] and "decode" in stats[1] and f"stop: {second.stop_reason}" in stats[1]


def test_reset_forgets_the_history_and_keeps_the_system_prompt(rt):
    rc, rec, _, err = run(rt, "hello", "/reset", "again", system="be brief")
    assert rc == 0
    system = {"role": "system", "content": "be brief"}
    assert rec.calls == [[system, user("hello")], [system, user("again")]]
    assert "conversation reset" in err


def test_system_sets_the_system_prompt_and_starts_over(rt):
    rc, rec, _, _ = run(rt, "hi", "/system you are a pirate", "ahoy", "/system", "plain")
    assert rc == 0
    assert rec.calls[0] == [user("hi")]
    assert rec.calls[1] == [{"role": "system", "content": "you are a pirate"}, user("ahoy")]
    assert rec.calls[2] == [user("plain")]


class InterruptOnce(io.StringIO):
    """Output whose k-th write raises KeyboardInterrupt (Ctrl-C while a reply streams)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def write(self, s):
        self.k -= 1
        if self.k == 0:
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_during_a_reply_stops_it_and_the_session_goes_on(rt):
    full = rt.generate([user("tell me")], max_new_tokens=N).text
    rc, rec, out, err = run(rt, "tell me", "go on", out=InterruptOnce(3))
    assert rc == 0 and len(rec.calls) == 2
    stopped = rec.results[0]
    assert isinstance(stopped, GenerationInterrupted) and stopped.result.stop_reason == "interrupted"
    partial = stopped.result.text
    assert partial and full.startswith(partial) and len(stopped.result.new_ids) < N
    assert rec.calls[1] == [user("tell me"), {"role": "assistant", "content": partial}, user("go on")]
    assert rec.results[1].text and out.endswith(rec.results[1].text + "\n\n")
    assert "stop: interrupted" in err and "Traceback" not in err


def test_ctrl_c_in_the_prefill_drops_the_line(rt):
    class Prefill(Recorder):
        def generate(self, prompt, **kw):
            if not self.calls:
                self.calls.append(prompt)
                raise GenerationInterrupted(None)
            return super().generate(prompt, **kw)
    rec, err = Prefill(rt), io.StringIO()
    assert chat_repl(rec, input_fn=script("first", "second"), out=io.StringIO(), err=err, max_new_tokens=2) == 0
    assert rec.calls == [[user("first")], [user("second")]]
    assert "dropped" in err.getvalue()


def test_eof_exit_quit_empty_lines_help_and_ctrl_c_at_the_prompt(rt):
    rc, rec, out, err = run(rt)
    assert (rc, rec.calls, out) == (0, [], "\n")
    rc, rec, _, err = run(rt, "", "   ", "/help", "/bogus", "/exit", "never sent")
    assert rc == 0 and rec.calls == []
    assert "/reset" in err and "/system" in err and "Ctrl-C" in err and "unknown command /bogus" in err
    assert run(rt, "/quit", "never sent")[1].calls == []

    def ctrl_c(prompt):
        raise KeyboardInterrupt
    assert chat_repl(rt, input_fn=ctrl_c, out=io.StringIO(), err=io.StringIO()) == 130


def test_an_error_is_reported_and_the_session_goes_on(tiny):
    small = hetero_rt.load(tiny, context=32)
    rc, rec, _, err = run(small, "word " * 40, "hi")
    assert rc == 0 and len(rec.calls) == 2
    assert rec.calls[1] == [user("hi")]              # the line that failed is not in the history
    assert "error:" in err and "/reset" in err and "Traceback" not in err


def test_conversation():
    c = Conversation("sys")
    c.add("user", "a")
    c.add("assistant", "b")
    msgs = c.messages
    msgs[1]["content"] = "changed"                      # a copy: the caller cannot edit the history
    assert c.messages == [{"role": "system", "content": "sys"}, user("a"), {"role": "assistant", "content": "b"}]
    c.reset()
    assert c.messages == [{"role": "system", "content": "sys"}]
    c.set_system("")
    assert c.messages == [] and c.system is None

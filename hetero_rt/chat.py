"""Interactive multi-turn chat on a Runtime: `Conversation` (the messages sent each turn) and
`chat_repl`, the loop behind `hetero-rt chat`.

Contract: every turn sends the whole conversation (system prompt, then the turns so far) through the
checkpoint's chat template, so the runtime's prefix cache prefills only what is new since the last
reply. The reply streams to `out` as it is generated; one line of timings per reply goes to `err`.
The REPL knows nothing of loading, placement or argument parsing (the CLI does those), and the
conversation nothing of the runtime.

Ctrl-C during a reply stops that reply, not the session; the part already shown is kept in the
conversation as the assistant's turn (as llama.cpp's llama-cli does), so the next turn continues
from what was on the screen. Stopped before any text (during the prompt's prefill), the user's line
is dropped too, so the history never holds a question without an answer. Ctrl-C at the input line
ends the session (as llama-cli does), returning 130; EOF (Ctrl-D), /exit and /quit return 0.
"""
from __future__ import annotations

import builtins
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from .errors import HeteroRTError
from .runtime.request import GenerationInterrupted, GenerationResult

PROMPT = "> "
HELP = """commands:
  /reset        forget the conversation (the system prompt is kept)
  /system TEXT  set the system prompt and start a new conversation (/system alone removes it)
  /exit, /quit  end the session (so do Ctrl-D and Ctrl-C at this prompt)
  /help         this text
Ctrl-C during a reply stops the reply; the part shown stays in the conversation."""


@dataclass
class Conversation:
    """The chat so far: an optional system prompt, then alternating user and assistant turns."""
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, str]]:
        """What one turn sends: the system prompt (when set), then every turn (a new list each call)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.turns]

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})

    def reset(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.turns.clear()

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None or "" removes it) starts a new conversation."""
        self.system = text or None
        self.reset()


def chat_repl(rt, *, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
              input_fn: Callable[[str], str] = builtins.input, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """Read lines from input_fn until EOF, /exit, /quit or Ctrl-C at the prompt; answer each with
    rt.generate over the whole conversation. out/err default to sys.stdout/sys.stderr at call time.
    Returns the exit status: 0, or 130 when Ctrl-C at the prompt ended the session."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if input_fn is builtins.input and sys.stdin.isatty():
        line_editing()
    conv = Conversation(system or None)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    print(f"[hetero-rt] chat with {rt.source}; /help for commands, /exit or Ctrl-D to leave", file=err)
    while True:
        try:
            line = input_fn(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(line, conv, err):
                return 0
            continue
        reply(rt, conv, line, sampling, out, err)


def line_editing() -> None:
    """Arrow keys and history for input(): importing readline installs them (absent on some platforms)."""
    try:
        importlib.import_module("readline")
    except ImportError:
        pass


def command(line: str, conv: Conversation, err: TextIO) -> bool:
    """Run one /command; False when it ends the session."""
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conv.reset()
        print("[hetero-rt] conversation reset", file=err)
    elif name == "/system":
        conv.set_system(arg.strip())
        said = f"set ({len(conv.system)} characters)" if conv.system else "removed"
        print(f"[hetero-rt] system prompt {said}; conversation reset", file=err)
    elif name == "/help":
        print(HELP, file=err)
    else:
        print(f"[hetero-rt] unknown command {name}; /help lists the commands", file=err)
    return True


def reply(rt, conv: Conversation, text: str, sampling: dict, out: TextIO, err: TextIO) -> None:
    """One turn: the user's text in, the reply streamed to out and added to the conversation."""
    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    conv.add("user", text)
    interrupted = False
    try:
        res = rt.generate(conv.messages, stream=stream, **sampling)
    except KeyboardInterrupt as stop:
        res, interrupted = (stop.result if isinstance(stop, GenerationInterrupted) else None), True
    except HeteroRTError as e:            # e.g. the conversation outgrew the context: say so, keep going
        conv.turns.pop()
        print(f"\n[hetero-rt] error: {e} (/reset starts a new conversation)", file=err)
        return
    out.write("\n")
    out.flush()
    if interrupted and (res is None or not res.text):
        conv.turns.pop()
        print("[hetero-rt] interrupted before any text; your line was dropped", file=err)
        return
    conv.add("assistant", res.text)
    print(stats(res) + ("; reply stopped by Ctrl-C, the part shown is kept" if interrupted else ""), file=err)


def stats(res: GenerationResult) -> str:
    """One line: prefill and decode tokens/s, tokens generated, prompt tokens reused, stop reason."""
    return (f"[hetero-rt] prefill {res.prefill_tokens_per_s:.1f} tok/s ({res.prefilled_tokens} prompt tokens, "
            f"{res.cached_tokens} cached); decode {res.decode_tokens_per_s:.2f} tok/s; {len(res.new_ids)} "
            f"tokens generated; stop: {res.stop_reason}")

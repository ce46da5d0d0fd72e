"""What every route shares: the runtime, the model's name, the server's metrics, and the two steps
of running a request: prompt ids to a reply budget (checked against the context), then a Generation
on the batcher. Routes hold a Service; there is no module-level state."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import HeteroRTError
from ..runtime.engine import Prompt, Runtime
from .bridge import Generation
from .errors import ApiError
from .metrics import ServerMetrics, expert_cache_layers


# the runtime's stop reasons a reply can end with, as both APIs name them (OpenAI finish_reason,
# Ollama done_reason); cancelled / interrupted / error replies never reach a client as a finish
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class Service:
    rt: Runtime
    model_name: str
    api_key: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.cache_layers = expert_cache_layers(self.rt)

    def encode(self, prompt: Prompt, param: str) -> list[int]:
        """Token ids of text, token ids or chat messages (templated); ApiError 400 naming `param`."""
        try:
            ids = self.rt.encode(prompt)
        except HeteroRTError as e:
            raise ApiError(400, str(e), param) from None
        if not ids:
            raise ApiError(400, f"{param} is empty: at least one token is needed", param)
        return ids

    def budget(self, n_prompt: int, requested: int | None, param: str, prompt_param: str) -> int:
        """New tokens a reply may have: `requested` (at least 1) clamped to the positions the context
        has left after the prompt (as llama-server does; finish_reason "length" says so); all of them
        when None. A prompt that leaves no room is an error saying its length and the limit."""
        room = self.rt.context - n_prompt
        if requested is not None and requested < 1:
            raise ApiError(400, f"{param} must be at least 1, got {requested}", param)
        if room < 1:
            raise ApiError(400, f"the prompt is {n_prompt} tokens but the context holds {self.rt.context} "
                                f"positions, and the reply needs at least one more: shorten the {prompt_param} or "
                                f"start the server with a larger --context", prompt_param, "context_length_exceeded")
        return room if requested is None else min(requested, room)

    def generation(self, ids: Sequence[int], max_new_tokens: int, sampling: dict[str, Any], stop: Any,
                   stream: bool) -> Generation:
        """A submitted Generation; the runtime's checks of the sampling values become ApiError 400."""
        try:
            g = Generation(self.rt, ids, max_new_tokens, stop=stop, stream=stream, on_finish=self.metrics.record,
                           **sampling)
        except HeteroRTError as e:
            raise ApiError(400, str(e), _param_named_in(str(e), sampling)) from None
        return g.start()


def _param_named_in(message: str, sampling: dict[str, Any]) -> str | None:
    """The sampling field an InputError message starts with (`temperature must be ...`), if any."""
    return next((name for name in (*sampling, "stop") if message.startswith(name)), None)

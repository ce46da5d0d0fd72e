"""The per-case hang guard of the fuzz and limit tests: a case that runs too long raises CaseTimeout
instead of hanging CI. SIGALRM reaches the main thread only, where pytest runs tests."""
from __future__ import annotations

import signal
from contextlib import contextmanager


class CaseTimeout(BaseException):
    """A case ran past its time limit (a BaseException: no `except Exception` in the code swallows it)."""


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"ran past {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

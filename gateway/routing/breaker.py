"""A circuit breaker per deployment: stop sending traffic to what keeps failing, try it
again after a cool-down, and give it its traffic back the moment it answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """closed → (``failures`` in a row) → open → (``cooldown`` later) half-open: one trial
    request; its success closes the breaker, its failure opens it again.

    Two rows are counted: failures before an answer begins, which its first token ends, and
    answers that broke off mid-way (``breaks``), which only an answer that came whole ends:
    a deployment whose every answer begins and breaks off opens it too.
    """

    __slots__ = ("_cooldown", "_threshold", "breaks", "failures", "on_change", "opened_at",
                 "state", "trial_running", "tripped")

    def __init__(self, failures: int, cooldown: float) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self.state: State = "closed"
        self.failures = 0
        self.breaks = 0
        self.opened_at = 0.0
        self.trial_running = False
        self.tripped = False  # open only because its backend was found down
        # Told when the breaker opens (True) or a trial closes it again (False), on what it
        # saw itself (other gateway processes hear of it: ``monitor.shared``).
        self.on_change: Callable[[bool], None] | None = None

    def available(self, now: float | None = None) -> bool:
        """Whether a request may go now (without claiming the half-open trial)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return (now if now is not None else time.monotonic()) - self.opened_at >= \
                self._cooldown
        return not self.trial_running

    def claim(self) -> None:
        """A request is going: if the breaker is not closed, it is the one trial."""
        if self.state != "closed":
            self.state = "half_open"
            self.trial_running = True

    def end_trial(self) -> None:
        """A trial ended without a verdict (the client left, the request was refused before
        reaching the upstream): let another request be the trial.
        """
        self.trial_running = False

    def success(self) -> None:
        """An answer, whole: the deployment works."""
        self.answering()
        self.breaks = 0

    def answering(self) -> None:
        """An answer began (its first token): the breaker closes, and the failures before
        an answer began are over (not the breaks: ``success``).
        """
        was = self.state
        self.state = "closed"
        self.failures = 0
        self.trial_running = self.tripped = False
        # Only a trial's answer says the deployment is back (a request sent before the
        # breaker opened, answering late, does not).
        if was == "half_open" and self.on_change is not None:
            self.on_change(False)

    def failure(self, broke: bool = False) -> None:
        """A failure; ``broke``: an answer that had begun broke off."""
        if broke:
            self.breaks += 1
        else:
            self.failures += 1
        self.trial_running = False
        if self.state == "half_open" or max(self.failures, self.breaks) >= self._threshold:
            was = self.state
            self.state = "open"
            self.tripped = False
            self.opened_at = time.monotonic()
            if was != "open" and self.on_change is not None:
                self.on_change(True)

    def trip(self) -> None:
        """Open at once (the backend behind it is known to be down)."""
        if self.state == "closed":
            self.tripped = True
        self.state = "open"
        self.opened_at = time.monotonic()
        self.trial_running = False

    def retry_now(self) -> None:
        """The backend is back: a breaker open only for that closes (the backend's probe was
        its trial); one its own failures opened allows a trial right away instead of after
        the cool-down.
        """
        if self.tripped:
            self.state = "closed"
            self.tripped = False
            self.failures = self.breaks = 0
            self.trial_running = False
        elif self.state != "closed":
            self.state = "half_open"
            self.trial_running = False

    def opened_elsewhere(self, remaining: float) -> None:
        """Another gateway process opened its breaker for this deployment: open here too
        for what remains of its cool-down (then one trial, as for one opened here).
        """
        self.tripped = False
        if self.state != "open":
            self.state = "open"
            self.opened_at = time.monotonic() - max(0.0, self._cooldown - remaining)
            self.trial_running = False

    def closed_elsewhere(self) -> None:
        """Another gateway process saw this deployment answer again: close here too."""
        self.state = "closed"
        self.failures = self.breaks = 0
        self.trial_running = self.tripped = False

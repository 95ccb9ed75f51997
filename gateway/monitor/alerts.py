"""Alerts: the config's rules checked against what the monitor sees, each alert sent once
when it starts and once when it ends.

A condition must hold for its rule's ``after`` seconds to fire, and it has ended only once
it has been gone for ``resolve_after`` seconds: a flapping backend is one alert, not a storm,
and one that is down but for a few seconds at a time is an alert all the same (its short
gaps bridged: see ``Alert.back``). An alert
that ended less than ``min_interval`` ago and starts again is sent only once that interval
has passed (if it still holds); notices that come within ``group_window`` seconds of each
other go out as one message.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from gateway.config import AlertRule, MonitorConfig
from gateway.monitor.sinks import Dispatcher, Notice
from gateway.monitor.window import Traffic


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule's condition holding now, for one target (a tunnel, a backend, a tier...)."""

    rule: AlertRule
    target: str
    summary: str

    @property
    def key(self) -> str:
        return f"{self.rule.id}:{self.target}" if self.target else self.rule.id


@dataclass(slots=True)
class Facts:
    """What the rules are checked against, gathered by the monitor."""

    tunnels: dict[str, float] = field(default_factory=dict)  # down ones: seconds down
    backends: dict[str, float] = field(default_factory=dict)  # down ones: seconds down
    redis: dict[str, float] = field(default_factory=dict)  # unreachable: seconds so
    usable_by_tier: dict[str, int] = field(default_factory=dict)  # every tier configured
    tier_of: dict[str, str] = field(default_factory=dict)  # backend → tier
    traffic: dict[float, Traffic | None] = field(default_factory=dict)  # window → traffic


def conditions(rules: tuple[AlertRule, ...], facts: Facts) -> list[tuple[Condition, float]]:
    """Each condition that holds now, with how long it has held (0: known only now)."""
    out: list[tuple[Condition, float]] = []
    for rule in rules:
        if rule.kind == "tunnel_down":
            out += [(Condition(rule, name, f"tunnel {name} has been down for {_dur(s)}"), s)
                    for name, s in facts.tunnels.items() if _targets(rule, name)]
        elif rule.kind == "backend_down":
            out += [(Condition(rule, name, f"backend {name} has been down for {_dur(s)}"), s)
                    for name, s in facts.backends.items() if _targets(rule, name)]
        elif rule.kind == "redis_down":
            out += [(Condition(rule, where, f"Redis at {where} has not answered for "
                               f"{_dur(s)}"), s) for where, s in facts.redis.items()]
        elif rule.kind == "no_route":
            tiers = [rule.target] if rule.target else list(facts.usable_by_tier)
            if rule.target and rule.target not in facts.usable_by_tier:
                continue
            usable = sum(facts.usable_by_tier.get(t, 0) for t in tiers)
            if not usable and facts.usable_by_tier:
                where = f"in the {rule.target} tier" if rule.target else "at all"
                out.append((Condition(rule, rule.target, f"no model can serve {where}: "
                                      "every backend is down or its breakers open"), 0.0))
        else:
            out += _rated(rule, facts)
    return out


def _rated(rule: AlertRule, facts: Facts) -> list[tuple[Condition, float]]:
    traffic = facts.traffic.get(rule.window)
    if traffic is None:
        return []
    window = _dur(rule.window)
    if rule.kind == "error_rate":
        out = []
        for backend, (ok, failed) in traffic.attempts.items():
            total = ok + failed
            if _targets(rule, backend) and total >= rule.min_requests and \
                    failed / total > rule.over:
                out.append((Condition(rule, backend, f"backend {backend}: {failed / total:.0%} "
                                      f"of {total:.0f} attempts failed in the last {window} "
                                      f"(over {rule.over:.0%})"), 0.0))
        return out
    if rule.kind == "cloud_share":
        answered = {tier: 0.0 for tier in ("primary", "server", "cloud")}
        for backend, (ok, _) in traffic.attempts.items():
            tier = facts.tier_of.get(backend)
            if tier is not None:
                answered[tier] += ok
        total = sum(answered.values())
        share = answered["cloud"] / total if total else 0.0
        if total >= rule.min_requests and share > rule.over:
            return [(Condition(rule, "", f"the cloud tier answered {share:.0%} of requests in "
                               f"the last {window} (over {rule.over:.0%}): the workstation "
                               "is not carrying its load"), 0.0)]
        return []
    if traffic.timed < rule.min_requests:
        return []
    value = traffic.p95 if rule.kind == "latency_p95" else traffic.ttft_p95
    what = "latency" if rule.kind == "latency_p95" else "time to first token"
    if value is not None and value > rule.over:
        return [(Condition(rule, "", f"p95 {what} was {value:.2f}s in the last {window} "
                           f"(over {rule.over:g}s)"), 0.0)]
    return []


def _targets(rule: AlertRule, name: str) -> bool:
    return not rule.target or rule.target == name


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(slots=True)
class Alert:
    condition: Condition
    seen: float  # when its condition began to hold (this time), moved on by its short gaps
    started: float = 0.0  # when it fired (0: not yet)
    gone: float = 0.0  # when its condition was last seen gone (0: it holds)
    sent: bool = False
    first: float = 0.0  # when its condition began to hold, gaps and all
    since: float = 0.0  # when it began to hold again after its last gap

    def back(self, now: float, held: float) -> None:
        """Its condition holds again (for ``held`` seconds), after a gap shorter than
        ``resolve_after``. A gap shorter than the time it had held before it is bridged,
        its length not counted (a tunnel back for a few seconds at a time between long drops
        was never down long enough at once to be an alert); a longer one starts it anew (a
        backend seen down for a moment now and then is not down).
        """
        since = max(now - held, self.gone)
        if since - self.gone < self.gone - self.since or self.sent:
            self.seen += since - self.gone
        else:
            self.seen = self.first = since
        self.since, self.gone = since, 0.0

    def summary(self, now: float) -> str:
        if self.first >= self.seen:
            return self.condition.summary
        return (f"{self.condition.summary}; it has held for {_dur(now - self.seen)} of the "
                f"last {_dur(now - self.first)}, gone only for moments")


class Alerter:
    def __init__(self, config: MonitorConfig, dispatcher: Dispatcher) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self.open: dict[str, Alert] = {}  # firing, or about to
        self._ended: dict[str, float] = {}  # key → when its last alert ended
        self.history: deque[Notice] = deque(maxlen=100)
        self._pending: list[Notice] = []
        self._pending_since = 0.0

    def check(self, holding: list[tuple[Condition, float]], now: float | None = None) -> None:
        """One round: start, keep or end alerts by what holds now; send what is due."""
        now = time.time() if now is None else now
        seen = set()
        for condition, held in holding:
            seen.add(condition.key)
            alert = self.open.get(condition.key)
            if alert is None:
                alert = self.open[condition.key] = Alert(condition, now - held, first=now - held,
                                                         since=now - held)
            elif alert.gone:
                alert.back(now, held)
            alert.condition = condition
            if not alert.sent and now - alert.seen >= condition.rule.after and \
                    now - self._ended.get(condition.key, -1e18) >= self._config.min_interval:
                alert.started, alert.sent = now, True
                self._notice(alert, "firing", now)
        for key, alert in list(self.open.items()):
            if key in seen:
                continue
            # Gone for less than resolve_after, it has not ended: a firing alert stays, and
            # one about to fire may go on (see Alert.back)
            alert.gone = alert.gone or now
            if now - alert.gone >= self._config.resolve_after:
                del self.open[key]
                if alert.sent:
                    self._ended[key] = now
                    self._notice(alert, "resolved", now)
        self._flush(now)

    def firing(self) -> list[Alert]:
        return [a for a in self.open.values() if a.sent]

    def _notice(self, alert: Alert, status: str, now: float) -> None:
        c = alert.condition
        notice = Notice(status, c.rule.id, c.rule.kind, c.target, c.rule.severity,
                        alert.summary(now), alert.started,
                        now if status == "resolved" else None)
        self.history.append(notice)
        if not self._pending:
            self._pending_since = now
        self._pending.append(notice)

    def flush(self) -> None:
        """Send what still waits for its group window (the gateway stops)."""
        self._flush(float("inf"))

    def _flush(self, now: float) -> None:
        if self._pending and now - self._pending_since >= self._config.group_window:
            batch, self._pending = self._pending, []
            self._dispatcher.send(batch)

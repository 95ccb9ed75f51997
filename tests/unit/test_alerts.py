"""The alert rules and their life: fired once, resolved once, no storm from a flapping
condition, a minimum interval, grouping; windowed quantiles as Prometheus computes them.
"""

from __future__ import annotations

import pytest

from gateway.config import AlertRule, MonitorConfig
from gateway.monitor.alerts import Alerter, Facts, conditions
from gateway.monitor.sinks import Dispatcher, Notice
from gateway.monitor.window import Traffic, quantile


class Sent(Dispatcher):
    def __init__(self) -> None:
        super().__init__([])
        self.batches: list[list[Notice]] = []

    def send(self, batch: list[Notice]) -> None:
        self.batches.append(batch)


DOWN = AlertRule("backend_down", after=10.0)


def alerter(**settings: float) -> tuple[Alerter, Sent]:
    sent = Sent()
    config = MonitorConfig(**{"resolve_after": 30.0, "min_interval": 300.0,  # type: ignore[arg-type]
                              "group_window": 0.0, **settings})
    return Alerter(config, sent), sent


def down(seconds: float, *names: str) -> list:  # type: ignore[type-arg]
    return conditions((DOWN,), Facts(backends={n: seconds for n in names or ("mac",)}))


def statuses(sent: Sent) -> list[list[tuple[str, str]]]:
    return [[(n.status, n.target) for n in batch] for batch in sent.batches]


def test_an_alert_fires_after_its_time_and_once() -> None:
    alerts, sent = alerter()
    alerts.check(down(5), now=100)
    assert sent.batches == []  # down 5 s of the 10 it takes
    alerts.check(down(10), now=105)
    for t in range(110, 200, 5):
        alerts.check(down(t - 95), now=t)
    assert statuses(sent) == [[("firing", "mac")]]
    assert "backend mac has been down" in sent.batches[0][0].summary


def test_a_flapping_condition_is_one_alert_resolved_once() -> None:
    alerts, sent = alerter()
    alerts.check(down(20), now=100)
    for t in range(105, 200, 10):  # gone for 5 s, back, gone...
        alerts.check([], now=t)
        alerts.check(down(1), now=t + 5)
    assert statuses(sent) == [[("firing", "mac")]]
    for t in range(200, 240, 5):
        alerts.check([], now=t)
    assert statuses(sent) == [[("firing", "mac")], [("resolved", "mac")]]


def test_one_down_but_for_a_few_seconds_at_a_time_is_an_alert() -> None:
    """Down 8 s, back for 2 s, again and again: each time down is shorter than the rule's
    10 s, and it was an alert never. The time it held is what counts, not the gaps.
    """
    alerts, sent = alerter()
    for t in range(100, 130, 10):
        for held in range(0, 8, 2):
            alerts.check(down(held), now=t + held)
        alerts.check([], now=t + 8)
    assert statuses(sent) == [[("firing", "mac")]]
    assert sent.batches[0][0].started == 112  # 8 + 2 s held, the 2 s between not counted
    assert sent.batches[0][0].summary == ("backend mac has been down for 2s; it has held for "
                                          "10s of the last 12s, gone only for moments")


def test_one_seen_now_and_then_for_a_moment_is_no_alert() -> None:
    """Down for a second every 20 s, for minutes: not down, whatever its total."""
    alerts, sent = alerter()
    for t in range(100, 400, 20):
        alerts.check(down(1), now=t)
        alerts.check([], now=t + 5)
    assert sent.batches == []


def test_one_gone_for_long_enough_starts_its_time_again() -> None:
    alerts, sent = alerter(resolve_after=30.0)
    alerts.check(down(8), now=100)
    alerts.check([], now=102)
    alerts.check([], now=140)  # gone for 38 s: it ended
    alerts.check(down(1), now=141)
    alerts.check(down(5), now=145)
    assert sent.batches == []
    alerts.check(down(10), now=150)
    assert statuses(sent) == [[("firing", "mac")]]

def test_one_that_comes_back_soon_waits_for_the_minimum_interval() -> None:
    alerts, sent = alerter(min_interval=300.0, resolve_after=0.0)
    alerts.check(down(20), now=100)
    alerts.check([], now=110)  # resolved
    alerts.check(down(20), now=200)  # back 90 s later: not sent yet
    alerts.check(down(120), now=300)
    assert len(sent.batches) == 2
    alerts.check(down(220), now=411)  # 301 s after it ended, still down: sent
    assert statuses(sent)[-1] == [("firing", "mac")]


def test_alerts_starting_together_go_out_as_one_message() -> None:
    alerts, sent = alerter(group_window=10.0)
    alerts.check(down(20, "mac"), now=100)
    alerts.check(down(20, "mac", "studio"), now=105)
    assert sent.batches == []
    alerts.check(down(30, "mac", "studio"), now=111)
    assert statuses(sent) == [[("firing", "mac"), ("firing", "studio")]]


def traffic(**fields: object) -> Traffic:
    values: dict[str, object] = {"seconds": 300.0, "requests": 100.0, "errors": 0.0,
                                 "timed": 100.0,
                                 "p50": 0.1, "p95": 0.2, "ttft_p95": 0.1,
                                 "output_tokens": 0.0, "hits": 0.0, "misses": 0.0,
                                 "attempts": {}}
    return Traffic(**{**values, **fields})  # type: ignore[arg-type]


def test_rated_rules() -> None:
    tiers = {"mac": "primary", "openai": "cloud"}
    rules = (AlertRule("error_rate", over=0.2, min_requests=10),
             AlertRule("cloud_share", over=0.5, min_requests=10),
             AlertRule("latency_p95", over=5.0), AlertRule("ttft_p95", over=2.0))
    quiet = Facts(tier_of=tiers, traffic={300.0: traffic(
        attempts={"mac": (90.0, 10.0), "openai": (40.0, 0.0)})})
    assert conditions(rules, quiet) == []
    bad = Facts(tier_of=tiers, traffic={300.0: traffic(
        p95=7.5, ttft_p95=3.0, attempts={"mac": (20.0, 30.0), "openai": (60.0, 0.0)})})
    found = {c.rule.kind: c.summary for c, _ in conditions(rules, bad)}
    assert found["error_rate"].startswith("backend mac: 60% of 50 attempts failed")
    assert found["cloud_share"].startswith("the cloud tier answered 75% of requests")
    assert found["latency_p95"].startswith("p95 latency was 7.50s")
    assert found["ttft_p95"].startswith("p95 time to first token was 3.00s")
    few = Facts(tier_of=tiers, traffic={300.0: traffic(
        requests=3.0, timed=3.0, p95=9.0, attempts={"mac": (0.0, 3.0)})})
    assert conditions(rules, few) == []  # too few to judge


def test_no_route_for_a_tier() -> None:
    rule = AlertRule("no_route", target="primary")
    assert conditions((rule,), Facts(usable_by_tier={"primary": 2, "cloud": 1})) == []
    [(condition, _)] = conditions((rule,), Facts(usable_by_tier={"primary": 0, "cloud": 1}))
    assert "in the primary tier" in condition.summary


def test_quantile_interpolates_within_its_bucket() -> None:
    bounds = (0.1, 0.5, 1.0)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == 0.05
    assert quantile(0.95, bounds, [50, 50, 0, 0]) == pytest.approx(0.46)  # 45 of the 50
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 1.0  # above the top bound: the top bound

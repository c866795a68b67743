"""Prometheus metrics of a serving run, through ``prometheus-client``.

Contract: ``ServeMetrics(controller)`` owns a private ``CollectorRegistry`` (so two servers in one process never
share counters): HTTP-side counters and a latency histogram the app updates, plus a collector that reads the
controller's telemetry (requests, rejections, switches, the current plan, per-plan p50/p99 and throughput,
memory per rank, queue depth) at scrape time. ``render()`` returns the body and content type of ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hf_adaptive.parallel.serve import Controller

LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _TelemetryCollector(Collector):
    """Reads the controller's telemetry when scraped; nothing is copied between scrapes."""

    def __init__(self, controller: Controller, in_flight: Callable[[], int]) -> None:
        self.controller, self.in_flight = controller, in_flight

    def collect(self) -> Iterator[Metric]:
        telemetry = self.controller.telemetry
        summary = telemetry.summarize()
        overall = summary["overall"]
        yield CounterMetricFamily("hf_adaptive_requests", "requests served", value=overall["requests"])
        yield CounterMetricFamily("hf_adaptive_rejected", "requests refused by memory admission or shutdown",
                                  value=overall["rejected"])
        yield CounterMetricFamily("hf_adaptive_switches", "layout switches", value=overall["switches"])
        plan = GaugeMetricFamily("hf_adaptive_current_plan", "the layout now serving (1)", labels=["plan"])
        plan.add_metric([telemetry.current_plan], 1)
        yield plan
        latency = GaugeMetricFamily("hf_adaptive_latency_seconds", "served latency quantiles per plan",
                                    labels=["plan", "quantile"])
        throughput = GaugeMetricFamily("hf_adaptive_throughput_tokens_per_second",
                                       "generated tokens per busy second, per plan", labels=["plan"])
        for name, stats in summary["per_plan"].items():
            latency.add_metric([name, "0.5"], stats["latency_p50_s"])
            latency.add_metric([name, "0.99"], stats["latency_p99_s"])
            throughput.add_metric([name], stats["throughput_tok_s"])
        yield latency
        yield throughput
        memory = GaugeMetricFamily("hf_adaptive_memory_fraction", "device memory over budget, per rank",
                                   labels=["rank"])
        with telemetry.lock:
            latest = telemetry.memory[-1][1] if telemetry.memory else []
        for rank, fraction in enumerate(latest):
            memory.add_metric([str(rank)], fraction)
        yield memory
        yield GaugeMetricFamily("hf_adaptive_queue_depth", "requests queued at the controller",
                                value=self.controller.queued())
        yield GaugeMetricFamily("hf_adaptive_http_in_flight", "HTTP requests accepted and not yet answered",
                                value=self.in_flight())


class ServeMetrics:
    """The registry behind ``/metrics`` and the counters the HTTP app updates."""

    def __init__(self, controller: Controller, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_TelemetryCollector(controller, in_flight))
        self.responses = Counter("hf_adaptive_http_responses", "HTTP responses by route and status",
                                 ["route", "status"], registry=self.registry)
        self.latency = Histogram("hf_adaptive_http_request_seconds", "time from accept to answer, per route",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

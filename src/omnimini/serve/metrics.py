"""Prometheus metrics: engine counters read at scrape time, plus HTTP request counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from omnimini.engine.scheduler import TTFT_BUCKETS


class EngineCollector:
    """Reads every served engine's EngineStats when /metrics is scraped (no locking on the hot path)."""

    def __init__(self, registry_of_models):
        self.models = registry_of_models

    def collect(self):
        req = CounterMetricFamily("omnimini_requests", "Generation requests received", labels=["model"])
        bg = CounterMetricFamily("omnimini_background_requests", "Requests run at background priority (batches)",
                                 labels=["model"])
        fin = CounterMetricFamily("omnimini_requests_finished", "Requests finished", labels=["model", "reason"])
        ptok = CounterMetricFamily("omnimini_prompt_tokens", "Prompt tokens received", labels=["model"])
        ctok = CounterMetricFamily("omnimini_prompt_tokens_cached", "Prompt tokens served from the prefix cache",
                                   labels=["model"])
        pblk = GaugeMetricFamily("omnimini_prefix_cache_blocks", "Prefix-cache KV blocks in use / capacity",
                                 labels=["model", "kind"])
        pev = CounterMetricFamily("omnimini_prefix_cache_evicted_blocks", "Prefix-cache blocks evicted (LRU)",
                                  labels=["model"])
        gtok = CounterMetricFamily("omnimini_generation_tokens", "Tokens generated", labels=["model"])
        wait = GaugeMetricFamily("omnimini_queue_depth", "Requests waiting for a slot", labels=["model"])
        run = GaugeMetricFamily("omnimini_running_sequences", "Sequences in the running batch", labels=["model"])
        ttft = HistogramMetricFamily("omnimini_time_to_first_token_seconds", "Time to first token",
                                     labels=["model"])
        for mid, served in self.models.models.items():
            st = served.engine.stats
            req.add_metric([mid], st.requests_total)
            bg.add_metric([mid], st.background_requests_total)
            for reason, n in dict(st.requests_finished).items():
                fin.add_metric([mid, reason], n)
            ptok.add_metric([mid], st.prompt_tokens_total)
            gtok.add_metric([mid], st.generation_tokens_total)
            ctok.add_metric([mid], st.prompt_tokens_cached_total)
            pc = served.engine.prefix_cache
            if pc is not None:
                pblk.add_metric([mid, "used"], pc.used_blocks)
                pblk.add_metric([mid, "capacity"], pc.capacity)
                pev.add_metric([mid], pc.stats.evicted_blocks)
            wait.add_metric([mid], served.engine.queue_depth)
            run.add_metric([mid], st.running)
            buckets = [(str(b), c) for b, c in zip(TTFT_BUCKETS, st.ttft_buckets, strict=True)]
            buckets.append(("+Inf", st.ttft_count))
            ttft.add_metric([mid], buckets, st.ttft_sum)
        yield from (req, bg, fin, ptok, ctok, gtok, wait, run, ttft, pblk, pev)


class Metrics:
    def __init__(self, models):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(models))
        self.http = Counter("omnimini_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

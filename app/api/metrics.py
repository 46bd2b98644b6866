"""Prometheus metrics at /metrics: HTTP traffic from this process, job figures from the database.

/metrics takes no API key (scrapers have none), so it says nothing about any one tenant or job: every label
is a status, a queue, a method, a route template or an HTTP status; job figures are totals per queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import session_scope
from app.models import Job, utcnow
from app.settings import Settings

DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 72 * 3600)
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class JobCollector:
    """Reads the database at scrape time, so every API replica reports the same job figures."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.resolved_database_url

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("kdistill_jobs", "Jobs by status", labels=["status"])
        depth = GaugeMetricFamily("kdistill_queue_depth", "Queued jobs waiting for a worker", labels=["queue"])
        speed = GaugeMetricFamily("kdistill_job_samples_per_second",
                                  "Training throughput of the running jobs of a queue, summed", labels=["queue"])
        running = GaugeMetricFamily("kdistill_running_jobs", "Running jobs per queue", labels=["queue"])
        with session_scope(self.url) as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for status in STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
            for queue, n in s.execute(select(Job.queue, func.count()).where(Job.status == "queued")
                                      .group_by(Job.queue)).all():
                depth.add_metric([queue], n)
            # Totals per queue, never per job: a job id is one tenant's business.
            for queue, n, sps in s.execute(select(Job.queue, func.count(), func.sum(Job.samples_per_s))
                                           .where(Job.status == "running").group_by(Job.queue)).all():
                running.add_metric([queue], n)
                speed.add_metric([queue], float(sps or 0.0))
            since = utcnow() - timedelta(days=7)
            spans = s.execute(select(Job.started_at, Job.finished_at).where(
                Job.finished_at >= since, Job.started_at.is_not(None), Job.status == "succeeded")).all()
        durations = [(end - start).total_seconds() for start, end in spans]
        buckets = [(str(b), sum(d <= b for d in durations)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        hist = HistogramMetricFamily("kdistill_job_duration_seconds",
                                     "Run time of jobs that succeeded in the last 7 days")
        hist.add_metric([], buckets, sum_value=sum(durations))
        yield from (jobs, depth, running, speed, hist)


def install_metrics(app: FastAPI, settings: Settings) -> None:
    registry = CollectorRegistry()
    requests = Counter("kdistill_http_requests_total", "HTTP requests", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("kdistill_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                        buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60), registry=registry)
    registry.register(JobCollector(settings))

    app.add_middleware(_Measure, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


class _Measure:
    """Pure ASGI (no per-request task or body copy, unlike BaseHTTPMiddleware): counts and times requests."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The path template, not the path: one series per endpoint however many job ids there are.
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "OTHER"  # no label a client can invent
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(time.perf_counter() - start)

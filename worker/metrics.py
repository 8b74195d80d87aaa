"""The worker's Prometheus metrics, served on ``SDQ_METRICS_HOST``:``SDQ_WORKER_METRICS_PORT`` (0 = off).

Each worker process has its own registry (not prometheus_client's global one), so a test can run several workers'
metrics side by side and nothing else in the process leaks into the worker's page.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.metrics_http import serve_metrics

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram(
            "sdq_batch_size", "Images per pipeline call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.steps_per_second = Gauge(
            "sdq_denoising_steps_per_second",
            "Denoising steps per second of the last pipeline call (one step advances every image of the batch).",
            registry=r,
        )
        self.images_per_second = Gauge(
            "sdq_images_per_second", "Images per second of the last pipeline call, text encoding to decode.", registry=r
        )
        self.steps = Counter("sdq_denoising_steps", "Denoising steps run (batch steps).", registry=r)
        self.images = Counter("sdq_images_generated", "Images generated.", registry=r)
        self.job_run_seconds = Histogram(
            "sdq_job_run_seconds", "Job run time in the worker, started to finished.", buckets=RUN_BUCKETS, registry=r
        )
        self.model_load_seconds = Gauge("sdq_model_load_seconds", "Time to load the checkpoint at start.", registry=r)
        self.warmup_seconds = Gauge(
            "sdq_warmup_seconds", "Time the warm-up of SDQ_WARMUP_SHAPES took at start, before the worker registered.",
            registry=r,
        )
        self.jobs = Counter("sdq_worker_jobs", "Jobs this worker finished, by outcome.", ["outcome"], registry=r)
        self.busy = Gauge("sdq_worker_busy", "1 while the worker collects or runs a batch, 0 while idle.", registry=r)

    def serve(self, host: str, port: int, *, chosen: bool) -> int:
        """Start the /metrics listener (see ``core.metrics_http``); returns its port, 0 when off.

        Raises ``MetricsPortError`` when it cannot listen: a chosen port that is taken, a bad host."""
        return serve_metrics(
            self.registry, what="worker", host=host, port=port, setting="SDQ_WORKER_METRICS_PORT", chosen=chosen
        )

    def pipeline_call(self, images: int, steps: int, steps_per_second: float, seconds: float) -> None:
        self.batch_size.observe(images)
        self.steps.inc(steps)
        self.images.inc(images)
        if steps_per_second > 0:
            self.steps_per_second.set(steps_per_second)
        if seconds > 0:
            self.images_per_second.set(images / seconds)

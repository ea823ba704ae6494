"""Prometheus metrics, all under the ``imagegate_`` prefix, in one registry per server instance.

A registry per instance (not prometheus-client's global one) lets tests run several servers in one
process and read exact values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Image generation takes from tens of milliseconds (tiny model) to minutes (big batches on slow
# hardware); the default prometheus buckets stop at 10 s.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 90.0, 120.0, 180.0, 300.0,
)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENCODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

ERROR_CAUSES = ("validation", "auth", "overload", "quota", "timeout", "cancelled", "oom", "not_ready",
                "shutdown", "unavailable", "internal")


class Metrics:
    """Every metric the server exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imagegate_http_requests", "HTTP requests by route template, dialect and status.",
            ["route", "dialect", "status"], registry=r,
        )
        # kind: "generate" (routes that make images), "poll" (status/result/progress reads),
        # "other"; so dashboards show generation latency apart from cheap polls.
        self.request_latency = Histogram(
            "imagegate_request_duration_seconds", "End-to-end HTTP request latency.",
            ["dialect", "kind"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "imagegate_errors", "Failed requests by dialect and cause.", ["dialect", "cause"],
            registry=r,
        )
        self.queue_requests = Gauge(
            "imagegate_queue_requests", "Requests waiting in the scheduler queue.", registry=r,
        )
        self.queue_images = Gauge(
            "imagegate_queue_images", "Images waiting in the scheduler queue.", registry=r,
        )
        self.queue_wait = Histogram(
            "imagegate_queue_wait_seconds", "Time from admission to the start of a request's first batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "imagegate_batch_images", "Images per pipeline call.", buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "imagegate_batch_duration_seconds", "Wall time of one pipeline call (encode prompt, denoise, decode).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.step_seconds = Histogram(
            "imagegate_denoise_step_seconds", "Mean denoising step time of a batch.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.decode_seconds = Histogram(
            "imagegate_vae_decode_seconds", "VAE decode time of a batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.encode_seconds = Histogram(
            "imagegate_encode_seconds", "Time to encode one image (PNG/JPEG/WebP, base64).",
            ["format"], buckets=ENCODE_BUCKETS, registry=r,
        )
        self.e2e_seconds = Histogram(
            "imagegate_generation_duration_seconds", "Admission to encoded result, per request.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter(
            "imagegate_images_generated", "Images generated.", registry=r,
        )
        self.batches = Counter(
            "imagegate_batches", "Pipeline calls; images_generated / batches is the mean batch size.",
            registry=r,
        )
        self.oom_splits = Counter(
            "imagegate_oom_splits", "Batches split in halves after running out of memory.", registry=r,
        )
        self.padded_images = Counter(
            "imagegate_padded_images",
            "Batch slots computed only to fill a static-shape batch bucket (their images are "
            "discarded); padded_images / (images_generated + padded_images) is the waste.",
            registry=r,
        )
        self.model_loaded = Gauge(
            "imagegate_model_loaded", "1 once the model weights are loaded.", registry=r,
        )
        self.ready = Gauge(
            "imagegate_ready", "1 while the server accepts work (loaded, warmed, not draining).", registry=r,
        )
        self.load_seconds = Gauge(
            "imagegate_model_load_seconds", "Time taken to load the model.", registry=r,
        )
        self.compile_seconds = Gauge(
            "imagegate_compile_seconds", "Time spent in torch.compile warm-up (0 when compile is off).",
            registry=r,
        )
        self.warmup_seconds = Gauge(
            "imagegate_warmup_seconds", "Total warm-up time before readiness.", registry=r,
        )
        self.gpu_memory = Gauge(
            "imagegate_gpu_memory_bytes", "CUDA memory allocated by torch now.", registry=r,
        )
        self.gpu_memory_peak = Gauge(
            "imagegate_gpu_memory_peak_bytes", "Peak CUDA memory allocated by torch.", registry=r,
        )
        self.compiles = Counter(
            "imagegate_compiles",
            "torch.compile graphs and AOT packages compiled, by reason (warmup, request, "
            "background: packages a background build made, counted when adopted). "
            "'request' must stay 0: a compile on the request path stalls every queued request.",
            ["reason"], registry=r,
        )
        self.aot_pending = Gauge(
            "imagegate_aot_pending_packages",
            "AOT packages (the UNet's, the decoder's, per warm-up size) a background build is "
            "still making; their calls run eagerly until each is adopted (--aot-build "
            "background).",
            registry=r,
        )
        self.eager_batches = Counter(
            "imagegate_eager_batches",
            "Batches in which compiled code ran eagerly because no warmed torch.compile graph "
            "matched (LoRA, ControlNet, an unwarmed size): right images at eager speed.",
            registry=r,
        )
        self.jobs = Gauge(
            "imagegate_jobs", "Async jobs in the task store by dialect and stored status "
            "(running: taken by a replica, waiting in its engine or generating).",
            ["dialect", "status"], registry=r,
        )
        self.webhooks = Counter(
            "imagegate_webhook_deliveries",
            "Webhook deliveries by dialect and outcome: sent (a 2xx), failed (every attempt "
            "refused or unanswered), abandoned (cut off by too many server stops). A delivery "
            "cut off by a stop is sent again by the next server, so one webhook may count twice.",
            ["dialect", "outcome"], registry=r,
        )
        self.info = Gauge(
            "imagegate_build_info", "Always 1; labels say what this process serves.",
            ["version", "model", "device", "compiled"], registry=r,
        )
        self.started = Gauge(
            "imagegate_started", "1 once the model has loaded and warmed up (stays 1 while draining).",
            registry=r,
        )
        for cause in ERROR_CAUSES:
            self.errors.labels("openai", cause)
        for reason in ("warmup", "request", "background"):
            self.compiles.labels(reason)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

"""GET /metrics in Prometheus's text exposition format (version 0.0.4).

    nanopipe_http_requests_total{method,route,status}   responses per route template and status
    nanopipe_queue_depth                                requests waiting for a decode slot
    nanopipe_active_sequences                           rows decoding now
    nanopipe_tokens_per_second                          the scheduler's recent decode rate
    nanopipe_generated_tokens_total                     tokens generated since start
    nanopipe_scheduler_requests_total{outcome}          generations ended: completed | cancelled | failed
    nanopipe_time_to_first_token_seconds                histogram: /v1 request submitted -> its first
                                                        event (queueing and prefill included)
    nanopipe_client_disconnects_total                   non-streaming /v1 requests whose client hung up
    nanopipe_workers_alive                              decode workers running

HttpMetrics is a pure ASGI middleware that counts every response by its route's template (so
/v1/chat/completions, never a client-chosen path: unknown paths are route="unmatched"), with
500 for an exception that escaped the app. The scheduler's numbers are read at scrape time.
"""
import math
import time
from bisect import bisect_left
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """What the server counts itself (the scheduler counts the rest)."""

    def __init__(self):
        self.responses = Counter()  # (method, route, status) -> count
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)  # non-cumulative; +Inf = ttft_count
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.disconnects = 0
        self.started = time.time()

    def observe_ttft(self, seconds):
        i = bisect_left(TTFT_BUCKETS, seconds)
        if i < len(TTFT_BUCKETS):
            self.ttft_buckets[i] += 1
        self.ttft_sum += seconds
        self.ttft_count += 1

    def observe_job(self, sub, tokens):
        """A /v1 request ended: its time to first event, if it got one."""
        if sub.first_event_at is not None:
            self.observe_ttft(sub.first_event_at - sub.submitted_at)

    def render(self, stats):
        """The exposition text; `stats`: the scheduler's stats()."""
        out = []

        def family(name, type_, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {type_}")
            for suffix, labels, value in samples:
                out.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

        family("nanopipe_http_requests_total", "counter", "HTTP responses by route template and status.",
               [("", {"method": m, "route": r, "status": str(s)}, n) for (m, r, s), n in sorted(self.responses.items())])
        family("nanopipe_queue_depth", "gauge", "Requests waiting for a decode slot.", [("", {}, stats["queue_depth"])])
        family("nanopipe_active_sequences", "gauge", "Sequences decoding now.", [("", {}, stats["active"])])
        family("nanopipe_tokens_per_second", "gauge", "Tokens generated per second, recent average.",
               [("", {}, stats["tokens_per_s"])])
        family("nanopipe_generated_tokens_total", "counter", "Tokens generated since start.",
               [("", {}, stats["tokens_served"])])
        cancelled = sum(w.get("requests_cancelled", 0) for w in stats["workers"])
        family("nanopipe_scheduler_requests_total", "counter", "Generations ended, by outcome.",
               [("", {"outcome": "completed"}, stats["requests_completed"]),
                ("", {"outcome": "cancelled"}, cancelled),
                ("", {"outcome": "failed"}, stats["requests_failed"])])
        cumulative, samples = 0, []
        for bound, n in zip(TTFT_BUCKETS, self.ttft_buckets):
            cumulative += n
            samples.append(("_bucket", {"le": _number(bound)}, cumulative))
        samples += [("_bucket", {"le": "+Inf"}, self.ttft_count), ("_sum", {}, self.ttft_sum),
                    ("_count", {}, self.ttft_count)]
        family("nanopipe_time_to_first_token_seconds", "histogram",
               "Time from a /v1 request's submission to its first token (queueing and prefill included).", samples)
        family("nanopipe_client_disconnects_total", "counter",
               "Non-streaming /v1 requests cancelled because their client hung up.", [("", {}, self.disconnects)])
        family("nanopipe_workers_alive", "gauge", "Decode workers running.", [("", {}, stats["alive_workers"])])
        return "\n".join(out) + "\n"


def _number(v):
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def _labels(labels):
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class HttpMetrics:
    """ASGI middleware: count each HTTP response by (method, route template, status)."""

    def __init__(self, app, metrics: Metrics, routes=()):
        """routes: the app's route list (read at request time): a request the body guard refused
        before routing still counts under its route when its path is one."""
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, counted)
        except BaseException:
            status = status or 500
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = scope["path"] if any(getattr(r, "path", None) == scope["path"] for r in self.routes) else "unmatched"
            self.metrics.responses[(scope["method"], path, status if status is not None else 0)] += 1

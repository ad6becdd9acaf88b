"""VLM labelling throughput (comparisons per second) against a local server, with 1, 8 and 32 requests in flight.

One comparison is one (pair, segment) asked in both orders (two requests, one after the other), as
``vidpo.labeling.vlm.VLMLabeler`` does; ``label.vlm.concurrency`` comparisons run at once, so that many requests
are in flight. Each measurement labels a fresh batch of synthetic pairs (``--frames`` frames of ``--size`` pixels,
``--segments`` segments, ``frames_per_segment`` 4, PNG images of ``--image-size`` pixels; no answer cache) and
counts comparisons over the wall time of ``label()`` (frame encoding included). Servers, each on 127.0.0.1:

    stub                a tiny HTTP server in a subprocess that reads each request, waits ``--delay-ms`` and answers
                        "TIE": the client's own ceiling against a server of fixed latency (ideal:
                        in_flight / (2 * delay) comparisons/s)
    transformers_serve  ``transformers serve`` over the tiny random LLaVA of tests/helpers/llava_serve.py (it
                        generates ``max_tokens`` 4 tokens; it runs one generation at a time)

A comparison whose first reply has no usable answer is a tie without its second question (the swap cannot undo
a failure), so a server that answers nonsense (the random LLaVA) sends fewer than two requests per comparison;
``request_rate`` rows give the requests per second beside it.

Rows (comparisons/s, requests/s, and the request latency p50 / p95 in ms and the measured mean requests in flight; median,
20th and 80th percentile over ``--repeats`` batches) are appended to benchmarks/results/label.csv with the columns
of benchmarks/common.py; ``x`` is ``inflight<N>-B<pairs>xS<segments>``.

Example (the committed CPU run):
    python benchmarks/bench_label.py --delay-ms 50 --inflight 1,8,32 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # helpers.llava_serve: the tiny LLaVA

import torch  # noqa: E402

import common  # noqa: E402
from vidpo.labeling import PairBatch, VLMConfig, VLMLabeler  # noqa: E402

KERNEL = "label"
DEFAULT_RESULTS = os.path.join(HERE, "results", "label.csv")


# ----- the stub server (run as a subprocess: `bench_label.py --serve-stub PORT DELAY_MS`) -----------------------
class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay_s = 0.05

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(self.delay_s)
        payload = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": "TIE"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args) -> None:
        pass


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256   # the listen backlog: 32 clients connecting at once must not be reset


def serve_stub(port: int, delay_ms: float) -> None:
    _StubHandler.delay_s = delay_ms / 1e3
    _StubServer(("127.0.0.1", port), _StubHandler).serve_forever()


class StubServer:
    """The stub in a subprocess on a free port (its own process: its threads do not share the client's GIL)."""

    def __init__(self, delay_ms: float) -> None:
        from helpers.llava_serve import free_port

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-stub",
                                         str(self.port), str(delay_ms)])
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise TimeoutError("the stub server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# ----- the measurement -----------------------------------------------------------------------------------------
def make_batch(pairs: int, frames: int, size: int, segments: int, seed: int) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)
    shape = (pairs, 3, frames, size, size)
    return PairBatch(first=torch.rand(shape, generator=gen) * 2 - 1, second=torch.rand(shape, generator=gen) * 2 - 1,
                     captions=[f"pair {seed}-{b}" for b in range(pairs)], pair_ids=[f"{seed}-{b}" for b in range(pairs)],
                     segment_ids=torch.arange(frames) * segments // frames, fps=16.0)


def measure(base_url: str, model: str, in_flight: int, args, max_tokens: int) -> dict:
    """Per repeat: comparisons/s, latency p50 / p95 (ms), mean requests in flight."""
    config = VLMConfig(base_url=base_url, model=model, concurrency=in_flight, timeout_s=120, max_retries=0,
                       frames_per_segment=4, image_size=args.image_size, max_tokens=max_tokens)
    labeler = VLMLabeler(config)
    pairs = max(2, -(-args.comparisons_per_slot * in_flight // args.segments))
    runs = {"comparisons/s": [], "requests/s": [], "latency_p50": [], "latency_p95": [], "mean_in_flight": []}
    labeler.label(make_batch(2, args.frames, args.size, args.segments, seed=-1))   # warm-up (connections, model)
    for repeat in range(args.repeats):
        batch = make_batch(pairs, args.frames, args.size, args.segments, seed=repeat)
        labeler.stats.reset()
        start = time.perf_counter()
        result = labeler.label(batch)
        wall = time.perf_counter() - start
        stats = labeler.stats.summary(wall)
        if stats["outcomes"] != {"200": stats["requests"]}:
            raise RuntimeError(f"requests failed: {stats['outcomes']} ({result.messages[:2]})")
        runs["comparisons/s"].append(pairs * args.segments / wall)
        runs["requests/s"].append(stats["requests"] / wall)   # < 2 x comparisons when a first reply is unusable
        runs["latency_p50"].append(stats["latency_p50_s"] * 1e3)
        runs["latency_p95"].append(stats["latency_p95_s"] * 1e3)
        runs["mean_in_flight"].append(stats["mean_in_flight"])
    return {"pairs": pairs, **runs}


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile (what common.quantiles gives, also for 1-2 values)."""
    return common.quantiles(values) if len(values) > 1 else (values[0],) * 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--providers", default="stub,transformers_serve")
    parser.add_argument("--inflight", default="1,8,32", help="requests in flight (label.vlm.concurrency)")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the stub's answer delay")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comparisons-per-slot", type=int, default=6,
                        help="comparisons per measured batch = this x in-flight (at least 2 pairs)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", default=DEFAULT_RESULTS)
    parser.add_argument("--serve-stub", nargs=2, metavar=("PORT", "DELAY_MS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stub:
        serve_stub(int(args.serve_stub[0]), float(args.serve_stub[1]))
        return 0
    stamp, version, command = common.timestamp(), _versions(), common.command_line()
    device = common.device_description(torch.device("cpu"))
    rows = []
    for provider in [p for p in args.providers.split(",") if p]:
        server, label, model, max_tokens = _start(provider, args)
        if server is None:
            continue
        try:
            for in_flight in (int(n) for n in args.inflight.split(",")):
                runs = measure(server.base_url, model, in_flight, args, max_tokens)
                x = f"inflight{in_flight}-B{runs['pairs']}xS{args.segments}"
                for metric, unit in (("comparisons/s", "comparisons/s"), ("requests/s", "requests/s"),
                                     ("latency_p50", "ms"),
                                     ("latency_p95", "ms"), ("mean_in_flight", "requests")):
                    name = {"comparisons/s": "throughput", "requests/s": "request_rate"}.get(metric, metric)
                    rows.append(common.make_row(KERNEL, label, "images-png", name, unit, x, spread(runs[metric]),
                                                device, stamp, version, command))
                rate = statistics.median(runs["comparisons/s"])
                print(f"{label:22s} {x:22s} {rate:9.1f} comparisons/s  p50 {statistics.median(runs['latency_p50']):7.1f}"
                      f" ms  in flight {statistics.median(runs['mean_in_flight']):5.1f}", flush=True)
        finally:
            server.close()
    common.append_rows(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


def _start(provider: str, args):
    """(server, provider label, model name, max_tokens), or (None, ..) when the provider cannot run here."""
    if provider == "stub":
        return StubServer(args.delay_ms), f"stub-{args.delay_ms:g}ms", "stub", 16
    if provider == "transformers_serve":
        from helpers.llava_serve import TransformersServer, build_tiny_llava, serve_unavailable

        reason = serve_unavailable()
        if reason:
            print(f"skipping transformers_serve: {reason}", file=sys.stderr)
            return None, None, None, None
        root = tempfile.mkdtemp(prefix="vidpo-bench-label-")
        server = TransformersServer(build_tiny_llava(os.path.join(root, "model")), os.path.join(root, "serve.log"))
        return server, "transformers_serve", server.model, 4
    raise SystemExit(f"unknown provider {provider!r}: stub or transformers_serve")


def _versions() -> str:
    parts = [common.versions()]
    for name in ("transformers", "fastapi", "uvicorn"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception:
            pass
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

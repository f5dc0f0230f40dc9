"""The model server under load on loopback: requests per second and latency, with N concurrent clients.

Run from the repository root, in the project's environment, after the pipeline has exported a model:

    source scripts/env.sh
    python benchmarks/http_load.py                       # starts `python -m serve.http` on a free port
    python benchmarks/http_load.py --url http://127.0.0.1:8000 --clients 16 --requests 5000

Each client sends one request at a time (`POST /predict`, `--images` test images as the form
field `images`) and the next as soon as its answer arrives; the run stops after `--requests`
requests or `--seconds` seconds, whichever comes first (so it is bounded in both). A request
fails on any status but 200, a transport error, or a prediction with an error in it. Clients and
server share this machine's cores, so on 2 cores the numbers are a floor; and the clients are one
Python process, which at about 32 clients is itself the bottleneck (see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_images(count: int) -> list[tuple[str, bytes, str]]:
    """Test-split images of the prepared data as PNG files in memory: (name, bytes, class)."""
    import numpy as np
    from PIL import Image

    manifest = json.loads((ROOT / "data/prepared/manifest.json").read_text())
    images = np.load(ROOT / "data/prepared/test-images.npy", mmap_mode="r")[:count]
    labels = np.load(ROOT / "data/prepared/test-labels.npy")[:count]
    scale = 255 / manifest["max_value"]
    out = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pixels = np.round(np.moveaxis(np.asarray(image), 0, -1) * scale).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
        out.append((f"test-{i}.png", buffer.getvalue(), manifest["classes"][label]))
    return out


def load(url: str, images: list[tuple[str, bytes, str]], clients: int, requests: int, seconds: float, per: int) -> dict:
    """Send up to `requests` requests from `clients` concurrent clients for at most `seconds`; the numbers."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    sent = 0

    async def client(c: httpx.AsyncClient, deadline: float) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            n = sent
            sent += 1
            files = [
                ("images", (name, data, "image/png"))
                for name, data, _ in (images[(n + k) % len(images)] for k in range(per))
            ]
            start = time.perf_counter()
            try:
                r = await c.post(f"{url}/predict", files=files)
                ok = r.status_code == 200 and not any("error" in p for p in r.json()["predictions"])
                if not ok:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - start)

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=30) as c:
            started = time.perf_counter()
            await asyncio.gather(*(client(c, started + seconds) for _ in range(clients)))
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "images_per_request": per,
        "requests": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "serve.http", "--port", str(port), "--no-access-log", "--threads", str(threads)]
    server = subprocess.Popen([*cmd, *(["--model", model] if model else [])], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not answer /health within 120 s (exit status {server.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one on a free port)")
    parser.add_argument("--model", help="the server's --model, when this starts it")
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads, when this starts it")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000, help="at most this many requests per client count")
    parser.add_argument("--seconds", type=float, default=30, help="at most this long per client count")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    os.chdir(ROOT)
    server, url = (None, args.url) if args.url else start_server(args.model, args.threads)
    try:
        images = test_images(256)
        load(url, images, 4, 100, 10, args.images)  # warm-up
        results = [load(url, images, n, args.requests, args.seconds, args.images) for n in args.clients]
    finally:
        if server:
            server.terminate()
            server.wait(10)
    print(
        f"HTTP load on loopback, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.images} image(s) per request, server --threads {args.threads}"
    )
    print("| clients | requests | failed | requests/s | p50 | p99 |\n|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests']:,} | {r['failed']} | {r['requests_per_s']:,} | "
            f"{r['p50_ms']} ms | {r['p99_ms']} ms |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if any(r["failed"] for r in results):
        raise SystemExit(f"failed requests: {[r['failures'] for r in results if r['failed']]}")


if __name__ == "__main__":
    main()

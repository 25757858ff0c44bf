"""Latency of ``cxrembed serve`` under a bounded local load, on an NIH-size store.

Builds a synthetic store of 112,120 x 512 vectors (``bench_search.synthetic``) whose
encoder is a randomly initialised ViT-B-32 (the real architecture: same compute as the
OpenAI weights), with its flat index; starts the real ``cxrembed serve`` on 127.0.0.1
(a free port; no other address is ever contacted); then, per phase, N client threads
each send a fixed number of requests over keep-alive connections and every latency is
recorded:

- ``id``: ``GET /api/search?id=...&k=10`` (a stored vector, the FAISS index);
- ``id+filters``: the same with ``split=test&exclude_same_patient=1``;
- ``text (stored)``: a prompt stored with the store (no model at query time);
- ``text (new)``: a text never seen (the text tower runs);
- ``image``: ``POST /api/search`` of a 1024x1024 PNG (upload, decode, ViT-B-32 forward,
  search), first by one client, then by N.

Before the server starts, one query's flat scan is timed in this process both ways the
server could answer it: FAISS's full scan of every vector, and the scan ``serve`` uses
(``cxrembed/serve/prefilter.py``: a bound on 64 principal directions prunes the rows FAISS
scores; the hits are the same, bit for bit), with the share of rows it scored.

The reference for image queries is one ViT-B-32 forward of one image, timed in this
fresh process on the same machine just before the image phases and again after them
(median of 7 each: the load of a shared machine moves). Errors (any
non-200 answer or failed request) are counted. The server's CPU time per request (user +
system, from /proc, over each phase) is printed beside the latencies: on a shared machine
it moves far less with the load than a latency does. The server and the clients share the
machine's cores, as they would on a laptop.

    python benchmarks/bench_serve.py [--images 112120] [--clients 4] [--requests 100]
        [--image-requests 8]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from bench_search import synthetic

HOST = "127.0.0.1"


def build_store(folder: Path, n: int, encoder) -> Path:
    """An ``n``-row store of synthetic vectors that names ``encoder`` as its own."""
    from cxrembed.encode.output import encoder_attrs
    from cxrembed.prompts import class_prompts, distinct_prompts
    from cxrembed.labels import LABELS
    from cxrembed.store import StoreWriter, build_index

    rng = np.random.default_rng(0)
    patients = np.sort(rng.integers(1, n // 4 + 1, n))
    follow = np.zeros(n, np.int64)
    for i in range(1, n):
        follow[i] = follow[i - 1] + 1 if patients[i] == patients[i - 1] else 0
    ids = np.array([f"{p:08d}_{f:03d}.png" for p, f in zip(patients, follow)])
    rows = {"image_id": ids, "patient_id": patients.astype(np.int64), "follow_up": follow,
            "split": np.array(["train", "val", "test"])[patients % 5 % 3],
            "view": np.array(["PA", "AP"])[rng.integers(0, 2, n)],
            "sex": np.array(["M", "F"])[rng.integers(0, 2, n)],
            "age": rng.integers(1, 90, n).astype(np.float32),
            "labels": (rng.random((n, len(LABELS))) < 0.08).astype(np.uint8),
            "image_path": ids}
    prompts = class_prompts()
    texts = distinct_prompts(prompts)
    import torch

    with torch.inference_mode():
        text_vectors = encoder.encode_text(texts).numpy()
    path = folder / "nih-size.h5"
    with StoreWriter.create(path, rows=rows, embed_dim=512, fingerprint=encoder.fingerprint,
                            has_head=False, has_text=True, batch_size=8192, chunk_rows=8192,
                            prompts=prompts, text_embeddings=text_vectors,
                            attrs=encoder_attrs(encoder)) as writer:
        vectors = synthetic(n, 512, seed=1, latent=16, uniform=False)
        for start in range(0, n, 8192):
            writer.append(vectors[start:start + 8192])
        writer.finish()
    build_index(path, "flat", progress=False)
    return path


FORWARD = """
import sys, time, numpy as np, torch
from cxrembed.model import load_encoder
encoder = load_encoder("ViT-B-32", "none")
x = torch.randn(1, 3, 224, 224)
encoder.encode_image(x)
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter(); encoder.encode_image(x); times.append(time.perf_counter() - start)
print(1000 * float(np.median(times)))
"""


def forward_ms(repeat: int) -> float:
    """Median time of one image through ViT-B-32 (batch of 1), in a fresh process: one
    that has run FAISS and HTTP clients measured forwards 5x slower than the server's."""
    done = subprocess.run([sys.executable, "-c", FORWARD, str(repeat)], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def query_png() -> bytes:
    import cv2

    rng = np.random.default_rng(2)
    small = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    big = cv2.resize(small, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".png", big)[1].tobytes()


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(port: int, make_request, clients: int, per_client: int) -> tuple[list[float], int]:
    """``clients`` threads, each sending ``per_client`` requests; latencies (ms), errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        mine = []
        for _ in range(per_client):
            method, url, body, headers = make_request(rng)
            start = time.perf_counter()
            try:
                conn.request(method, url, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"hits"' in payload
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
            mine.append(1000 * (time.perf_counter() - start))
            if not ok:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    exe = shutil.which("cxrembed") or str(Path(sys.executable).with_name("cxrembed"))
    process = subprocess.Popen([exe, "serve", str(store), "--host", HOST, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"cxrembed serve exited: {process.stderr.read()}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/api/store")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("cxrembed serve did not answer within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=112_120)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100, help="per client, id/text phases")
    parser.add_argument("--image-requests", type=int, default=8, help="per client, image phase")
    args = parser.parse_args()

    from cxrembed.model import load_encoder

    encoder = load_encoder("ViT-B-32", "none")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        began = time.perf_counter()
        store = build_store(Path(tmp), args.images, encoder)
        print(f"store: {args.images:,} x 512 synthetic vectors + flat index, ViT-B-32 "
              f"(random init) as its encoder; built in {time.perf_counter() - began:.1f} s")
        from cxrembed.store import EmbeddingStore

        with EmbeddingStore.open(store) as opened:
            ids = [str(i) for i in opened.image_id]
            prompts = list(opened.text_embeddings())
        scan_figures(store)
        port = free_port()
        server = start_server(store, port)
        try:
            run_phases(port, ids, prompts, args, server.pid)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def scan_figures(store: Path, queries: int = 30) -> None:
    """Median time of one query's flat scan, full and pruned, in this process (1 thread)."""
    import faiss

    from cxrembed.serve.prefilter import BoundedFlat
    from cxrembed.store import EmbeddingStore, load_index, search_index

    faiss.omp_set_num_threads(1)
    with EmbeddingStore.open(store) as opened:
        index = load_index(opened).index
        began = time.perf_counter()
        front = BoundedFlat(index)
        prepared = time.perf_counter() - began
        rows = np.random.default_rng(3).integers(0, len(opened), queries)
        vectors = opened.embeddings(rows)
    times: dict[str, list[float]] = {"full": [], "pruned": []}
    shares, same = [], True
    for row, query in zip(rows, vectors):
        allowed = np.ones(index.ntotal, bool)
        allowed[row] = False  # an id query leaves itself out
        for name, scan in (("full", lambda: search_index(index, query[None], 10,
                                                          allowed=allowed)),
                           ("pruned", lambda: front.search(query[None], 10, allowed=allowed))):
            start = time.perf_counter()
            found = scan()
            times[name].append(1000 * (time.perf_counter() - start))
            if name == "full":
                full = found
        same &= all(np.array_equal(a, b) for a, b in zip(full, found))
        keep = front.candidates(query, 10, allowed)
        shares.append(1.0 if keep is None else float(keep.mean()))
    full_ms, pruned_ms = np.median(times["full"]), np.median(times["pruned"])
    print(f"one query's flat scan (median of {queries}, 1 thread): full {full_ms:.1f} ms, "
          f"pruned {pruned_ms:.1f} ms ({full_ms / pruned_ms:.1f}x; median share of rows "
          f"scored {np.median(shares):.4f}; same hits: {same}; prepared in {prepared:.1f} s); "
          f"load average {os.getloadavg()[0]:.1f}")


def run_phases(port: int, ids: list[str], prompts: list[str], args, pid: int) -> None:
    from urllib.parse import quote

    png, content_type = multipart(query_png(), "query.png")
    get = lambda url: ("GET", url, None, {})  # noqa: E731
    id_query = lambda rng: get(f"/api/search?id={ids[rng.integers(len(ids))]}&k=10")  # noqa: E731
    stored_text = lambda rng: get(  # noqa: E731
        "/api/search?k=10&text=" + quote(prompts[rng.integers(len(prompts))]))
    image = lambda rng: ("POST", "/api/search?k=10", png, {"Content-Type": content_type})  # noqa: E731
    phases = [
        ("id", 1, args.requests, id_query),
        ("id", args.clients, args.requests, id_query),
        ("id+filters", args.clients, args.requests,
         lambda rng: get(f"/api/search?id={ids[rng.integers(len(ids))]}&k=10&split=test"
                         "&exclude_same_patient=1")),
        ("text (stored)", 1, args.requests, stored_text),
        ("text (stored)", args.clients, args.requests, stored_text),
        ("text (new)", args.clients, max(1, args.requests // 4),
         lambda rng: get(f"/api/search?k=10&text=opacity%20number%20{rng.integers(10**9)}")),
        ("image", 1, args.image_requests, image),
        ("image", args.clients, args.image_requests, image),
    ]
    # One warm-up of each kind (the server loads its encoder on the first text/image query).
    load(port, id_query, 1, 3)
    load(port, phases[5][3], 1, 1)
    load(port, image, 1, 1)
    print(f"load average before the phases (1 min): {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"{'queries':<14} {'clients':>7} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'req/s':>7} {'errors':>6} {'srv CPU ms/req':>14}")
    forward = None
    for name, clients, per_client, make in phases:
        if name == "image" and forward is None:
            # Timed here, just before the image phases, as the machine's load varies.
            forward = forward_ms(repeat=7)
            print(f"{'':<14} one ViT-B-32 forward (1 image, a fresh process, idle server): "
                  f"{forward:.1f} ms")
        began, cpu_before = time.perf_counter(), cpu_seconds(pid)
        latencies, errors = load(port, make, clients, per_client)
        wall = time.perf_counter() - began
        cpu_after = cpu_seconds(pid)
        cpu = (f"{1000 * (cpu_after - cpu_before) / len(latencies):>14.1f}"
               if cpu_before is not None and cpu_after is not None else f"{'?':>14}")
        p50, p95 = np.percentile(latencies, [50, 95])
        extra = f"   p50 = {p50 / forward:.2f}x one forward" if name == "image" else ""
        print(f"{name:<14} {clients:>7} {len(latencies):>8} {p50:>8.1f} {p95:>8.1f} "
              f"{len(latencies) / wall:>7.1f} {errors:>6} {cpu}{extra}")
    print(f"one ViT-B-32 forward after the load: {forward_ms(repeat=7):.1f} ms; "
          f"load average (1 min): {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

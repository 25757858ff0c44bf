"""``cxrembed serve``: the JSON API against the CLI and a numpy reference, its refusals
(bad queries, uploads, paths, tokens), predictions from an adapt run's head, and the real
server and page in subprocesses on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cxrembed.errors import ConfigError
from cxrembed.serve import ServeLimits, bind, create_app, is_loopback, open_service
from cxrembed.store import EmbeddingStore

CXREMBED = shutil.which("cxrembed") or str(Path(sys.executable).with_name("cxrembed"))
LOCAL = "http://127.0.0.1"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    from cxrembed.data.nih import load_nih
    from cxrembed.data.synth import make_twin

    return load_nih(make_twin(tmp_path_factory.mktemp("twin") / "nih", images=48, size=64,
                              seed=3, workers=0))


@pytest.fixture(scope="module")
def store_path(nih, tmp_path_factory):
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    out = tmp_path_factory.mktemp("store") / "tiny.h5"
    encode_dataset(nih, out, load_encoder(model="cxr-tiny", pretrained="none"), batch_size=16,
                   progress=False)
    return out


@pytest.fixture(scope="module")
def service(store_path):
    service = open_service(store_path)
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service), base_url=LOCAL)


def png_of(nih, i: int) -> tuple[str, bytes]:
    path = Path(nih.path[i])
    return path.name, path.read_bytes()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CXREMBED, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------
# Results: the CLI's, and a numpy brute force


@pytest.mark.slow
def test_api_results_equal_cli_search_json(client, store_path, nih):
    """The same query through `cxrembed search --json` (a real subprocess) and the API."""
    image_id = str(nih.image_id[5])
    name, data = png_of(nih, 11)
    cases = [
        (["--id", image_id, "-k", "6", "--split", "train", "--exclude-same-patient"],
         lambda: client.get("/api/search", params={"id": image_id, "k": 6, "split": "train",
                                                   "exclude_same_patient": 1})),
        (["--text", "left pleural effusion", "-k", "5"],  # not a stored prompt: encoded
         lambda: client.get("/api/search", params={"text": "left pleural effusion", "k": 5})),
        (["--image", str(nih.path[11]), "-k", "4", "--exclude-same-patient"],
         lambda: client.post("/api/search", params={"k": 4, "exclude_same_patient": "true"},
                             files={"image": (name, data, "image/png")})),
    ]
    for args, ask in cases:
        done = run_cli("search", str(store_path), *args, "--json")
        assert done.returncode == 0, done.stderr
        cli = json.loads(done.stdout)
        response = ask()
        assert response.status_code == 200, response.text
        api = response.json()
        assert api["hits"] == cli["hits"], args
        assert api["centring"] == cli["centring"], args  # centred alike, for the same reason
        assert api["query"]["kind"] == cli["query"]["kind"]
        assert len(cli["hits"]) == int(args[args.index("-k") + 1])


def test_id_search_equals_numpy_top_k(client, store_path):
    with EmbeddingStore.open(store_path) as store:
        x, split, patient = store.embeddings(), store.split.copy(), store.patient_id.copy()
        ids = list(store.image_id)
        centred = bool(store.attrs["search_centring"]["centre"])
    if centred:  # the encode's figure chose centring: the reference centres too (numpy)
        x = x - x.astype(np.float64).mean(axis=0)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    assert client.get("/api/store").json()["centring"]["centred"] is centred
    for row in (0, 17, len(ids) - 1):
        for params in ({}, {"split": "test"}, {"exclude_same_patient": "1"}):
            allowed = np.ones(len(ids), bool) if "split" not in params else split == "test"
            allowed[row] = False
            if params.get("exclude_same_patient"):
                allowed &= patient != patient[row]
            sims = np.where(allowed, x @ x[row], -np.inf)
            k = min(7, int(allowed.sum()))
            expected = np.argsort(-sims, kind="stable")[:k]
            body = client.get("/api/search", params={"id": ids[row], "k": k, **params}).json()
            assert [h["row"] for h in body["hits"]] == list(expected)
            np.testing.assert_allclose([h["similarity"] for h in body["hits"]],
                                       sims[expected], rtol=1e-5, atol=1e-6)
            assert body["query"] == {"kind": "id", "value": ids[row], "row": row,
                                     "patient_id": int(patient[row])}


def test_store_summary(client, store_path):
    body = client.get("/api/store").json()
    with EmbeddingStore.open(store_path) as store:
        assert body["images"] == len(store)
        assert body["patients"] == len(np.unique(store.patient_id))
        assert sum(body["splits"].values()) == len(store)
        assert body["splits"]["test"] == int((store.split == "test").sum())
        assert set(body["examples"]) <= set(store.image_id)
    assert body["index"]["kind"] == "flat" and body["text_queries"] is True
    assert body["predictor"] is None and body["model"] == "cxr-tiny"


def test_the_index_and_encoder_are_loaded_once(service, client, nih, monkeypatch):
    import cxrembed.search as search_module
    import cxrembed.store.reader as reader

    def no_reload(*args, **kwargs):
        raise AssertionError("the server loaded the index or encoder again")

    client.get("/api/search", params={"text": "a new phrase for the encoder", "k": 2})
    monkeypatch.setattr(search_module, "load_index", no_reload)
    monkeypatch.setattr(reader.EmbeddingStore, "encoder", no_reload)
    name, data = png_of(nih, 3)
    assert client.get("/api/search", params={"id": str(nih.image_id[0]), "k": 3}).status_code == 200
    assert client.get("/api/search", params={"text": "another phrase", "k": 3}).status_code == 200
    assert client.post("/api/search", files={"image": (name, data)}).status_code == 200


# ---------------------------------------------------------------------------------------
# Refusals: every error is JSON with a 4xx status and a message


@pytest.mark.parametrize("params,status,words", [
    ({"id": "99999999_000.png"}, 404, "not in store"),
    ({}, 400, "exactly one query"),
    ({"id": "00000001_000.png", "text": "edema"}, 400, "exactly one query"),
    ({"text": "edema", "k": 0}, 400, "k=0"),
    ({"text": "edema", "k": 10_000}, 400, "k=10000"),
    ({"text": "edema", "k": "ten"}, 422, "k: "),
    ({"text": "edema", "split": "holdout"}, 400, "unknown split 'holdout'"),
    ({"text": "edema", "exclude_same_patient": 1}, 400, "cannot tell the patient"),
    ({"text": "   "}, 400, "empty"),
])
def test_bad_queries_get_json_errors(client, params, status, words):
    response = client.get("/api/search", params=params)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_uploads_are_checked(store_path, nih):
    service = open_service(store_path, limits=ServeLimits(max_upload_bytes=2048))
    client = TestClient(create_app(service), base_url=LOCAL)
    name, data = png_of(nih, 2)
    assert len(data) > 2048  # 64 px noisy PNGs
    try:
        too_big = client.post("/api/search", files={"image": (name, data, "image/png")})
        assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
        huge = client.post("/api/search", files={"image": ("a.png", b"\x89PNG" + b"0" * 200_000)})
        assert huge.status_code == 413  # refused by the body limit before parsing
        html = client.post("/api/search", files={"image": ("x.png", b"<html>hi</html>")})
        assert html.status_code == 415 and "not a PNG, JPEG or DICOM" in html.json()["error"]
        broken = client.post("/api/search",
                             files={"image": ("y.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)})
        assert broken.status_code == 422 and "y.png" in broken.json()["error"]
        assert "/tmp" not in broken.json()["error"] and "cxrembed-upload" not in broken.text
        missing = client.post("/api/search", params={"k": 3})
        assert missing.status_code == 422 and "image" in missing.json()["error"]
        no_head = client.post("/api/predict", files={"image": ("z.png", data[:1000])})
        assert no_head.status_code == 400 and "--head" in no_head.json()["error"]
    finally:
        service.close()


def test_dicom_upload_finds_what_the_same_png_finds(client, nih, tmp_path):
    """A DICOM of the same pixels as a PNG is the same query (the decoder reads both)."""
    import cv2

    pytest.importorskip("pydicom")
    from dicom_files import write_dicom

    pixels = cv2.imread(str(nih.path[6]), cv2.IMREAD_UNCHANGED)
    dicom = write_dicom(tmp_path / "scan.dcm", pixels).read_bytes()
    assert dicom[128:132] == b"DICM"
    ask = {"k": 5, "split": "train"}
    from_png = client.post("/api/search", params=ask,
                           files={"image": ("scan.png", Path(nih.path[6]).read_bytes())})
    from_dicom = client.post("/api/search", params=ask, files={"image": ("scan.dcm", dicom)})
    unnamed = client.post("/api/search", params=ask, files={"image": ("blob", dicom)})
    assert from_dicom.status_code == 200, from_dicom.text
    assert from_dicom.json()["hits"] == from_png.json()["hits"] == unnamed.json()["hits"]
    assert unnamed.json()["query"]["value"] == "upload.dcm"


def test_upload_name_cannot_choose_a_path(client, nih):
    """A client file name is reduced to a plain name; a hostile one is replaced."""
    _, data = png_of(nih, 4)
    for name in ("../../../../tmp/owned.png", "/etc/passwd", ".hidden.png", "a b;rm.png"):
        body = client.post("/api/search", files={"image": (name, data, "image/png")}).json()
        assert body["query"]["value"] in ("owned.png", "upload.png"), body
    assert not Path("/tmp/owned.png").exists()


def test_thumbnails_only_for_stored_ids(client, store_path, nih):
    from cxrembed.data.images import decode

    ok = client.get(f"/api/thumb/{nih.image_id[1]}")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    import cv2

    pixels = cv2.imdecode(np.frombuffer(ok.content, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(pixels, decode(nih.path[1], size=256))
    with EmbeddingStore.open(store_path) as store:
        stored_path = str(store.image_path[1])
    secret = store_path.parent / "secret.txt"
    secret.write_text("not for the client")
    for attempt in ("..%2Fsecret.txt", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                    "../../etc/passwd", "..", "%2E%2E%2Fsecret.txt", str(secret),
                    stored_path.replace("/", "%2F"), "secret.txt"):
        response = client.get(f"/api/thumb/{attempt}")
        assert response.status_code == 404, attempt
        assert "not for the client" not in response.text and "root:" not in response.text
        assert response.headers["content-type"] == "application/json"


def test_thumbnail_of_an_image_not_on_disk(store_path, nih, tmp_path):
    service = open_service(store_path, data_root=tmp_path)  # images are elsewhere
    try:
        response = TestClient(create_app(service), base_url=LOCAL).get(
            f"/api/thumb/{nih.image_id[0]}")
        assert response.status_code == 404 and "--data" in response.json()["error"]
    finally:
        service.close()


def test_token_guards_the_api(service):
    client = TestClient(create_app(service, token="s3cret"), base_url=LOCAL)
    assert client.get("/api/store").status_code == 401
    assert client.get("/api/store", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "token" in client.get("/api/store").json()["error"]
    assert client.get("/api/store", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/store", params={"token": "s3cret"}).status_code == 200
    assert client.get("/").status_code == 200  # the page holds no data


def test_other_host_names_are_refused(service):
    """A page on another site cannot reach a loopback server through DNS rebinding."""
    client = TestClient(create_app(service), base_url="http://attacker.example")
    assert client.get("/api/store").status_code == 400


def test_bind_needs_a_token_off_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ConfigError, match="--token"):
        bind("0.0.0.0", 0)
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*--port"):
            bind("127.0.0.1", port)
    finally:
        sock.close()


def test_connections_answer_without_nagle_delay():
    """Accepted connections inherit TCP_NODELAY from the listening socket: without it every
    keep-alive answer waited ~40 ms for the client's delayed ACK (uvicorn writes the head
    and the body of a response separately)."""
    import socket

    sock = bind("127.0.0.1", 0)
    client = socket.create_connection(sock.getsockname()[:2], timeout=5)
    try:
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        sock.close()


def test_cli_refuses_an_open_address_without_token(store_path):
    done = run_cli("serve", str(store_path), "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert done.returncode == 1 and "--token" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------
# Predictions: an adapt run's own head on the uploaded image


@pytest.fixture(scope="module")
def adapted_run(tmp_path_factory):
    from cxrembed.model.adapted import AdaptedCLIP, save_adapted
    from cxrembed.model.head import DiagnosisHead
    from cxrembed.model.loading import create_clip

    run = tmp_path_factory.mktemp("run")
    clip, source = create_clip("cxr-tiny", "none")
    save_adapted(run, AdaptedCLIP(clip, DiagnosisHead(), unfreeze=3), model_name="cxr-tiny",
                 base_weights=source.fingerprint())
    return run


@pytest.mark.slow
def test_predict_equals_the_runs_head_logits_from_encode(nih, adapted_run, tmp_path):
    """`encode --checkpoint RUN` stores the head's logits; /api/predict on the same image
    gives their sigmoid, and shares the store's encoder (one model in memory)."""
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    out = tmp_path / "adapted.h5"
    encode_dataset(nih, out, load_encoder(checkpoint=adapted_run), batch_size=16,
                   progress=False, allow_other_data=True)
    service = open_service(out, head=adapted_run)
    try:
        client = TestClient(create_app(service), base_url=LOCAL)
        assert client.get("/api/store").json()["predictor"]["kind"] == "adapted"
        for i in (0, 9):
            name, data = png_of(nih, i)
            body = client.post("/api/predict", files={"image": (name, data, "image/png")}).json()
            expected = 1 / (1 + np.exp(-service.store.head_logits([i])[0]))
            assert [s["label"] for s in body["scores"]] == service.store.label_names
            np.testing.assert_allclose([s["score"] for s in body["scores"]], expected,
                                       atol=1e-5)
            assert all(s["threshold"] is None for s in body["scores"])
        assert service.predictor.encoder() is service.encoder()
    finally:
        service.close()


def test_head_folder_is_checked(store_path, tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        open_service(store_path, head=tmp_path / "absent")
    with pytest.raises(ConfigError, match="cxrembed fit"):
        open_service(store_path, head=tmp_path)


@pytest.mark.slow
def test_predict_equals_cxrembed_predict_with_a_fitted_head(store_path, nih, tmp_path):
    """A `cxrembed fit` head (calibrated, with val thresholds): /api/predict gives what
    the real `cxrembed predict` (a subprocess) writes for the same images."""
    head = tmp_path / "head"
    done = run_cli("fit", str(store_path), "--head", "linear", "--all", "--out", str(head))
    assert done.returncode == 0, done.stderr
    images = [str(nih.path[i]) for i in (1, 20, 33)]
    done = run_cli("predict", *images, "--head", str(head), "--out", str(tmp_path / "p.json"),
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "p.json").read_text())
    rows = {row["path"]: row for row in written["predictions"]}
    service = open_service(store_path, head=head)
    try:
        client = TestClient(create_app(service), base_url=LOCAL)
        described = client.get("/api/store").json()["predictor"]
        assert described["kind"] == "linear" and described["calibration"] == "platt"
        for path in images:
            body = client.post("/api/predict", files={"image": (Path(path).name,
                                                                Path(path).read_bytes())}).json()
            row = rows[path]
            for score in body["scores"]:
                expected = row[f"{score['label']} probability"]
                if expected is None:
                    assert score["score"] is None
                else:
                    assert score["score"] == pytest.approx(expected, abs=2e-6)
                assert score["positive"] == row[f"{score['label']} positive"]
            positives = [s["label"] for s in body["scores"] if s["positive"]]
            assert "|".join(positives) == row["positives"]
        assert service.predictor.encoder() is service.encoder()  # the store's, shared
    finally:
        service.close()


# ---------------------------------------------------------------------------------------
# The real server and the page, in subprocesses on 127.0.0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 30):
    with NO_PROXY.open(url, timeout=timeout) as response:
        return response.status, response.read()


class Server:
    """`cxrembed serve` in a subprocess; waits (bounded) until it answers."""

    def __init__(self, store: Path, *args: str, wait_s: float = 90) -> None:
        self.port = free_port()
        self.url = f"{LOCAL}:{self.port}"
        self.process = subprocess.Popen(
            [CXREMBED, "serve", str(store), "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited: {self.process.communicate()[1]}")
            try:
                if get(self.url + "/api/store", timeout=2)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"serve did not answer within {wait_s} s")

    def stop(self, timeout: float = 20) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


@pytest.mark.slow
def test_real_server_answers_and_stops_on_ctrl_c(store_path, service, nih):
    server = Server(store_path)
    try:
        image_id = str(nih.image_id[7])
        status, body = get(f"{server.url}/api/search?id={image_id}&k=5&split=train")
        assert status == 200
        assert json.loads(body) == service.search(image_id=image_id, k=5, split="train")
        status, page = get(server.url + "/")
        assert status == 200 and b"/static/app.js" in page
        with pytest.raises(urllib.error.HTTPError) as error:
            get(f"{server.url}/api/thumb/..%2F..%2Fetc%2Fpasswd")
        assert error.value.code == 404
    finally:
        code, err = server.stop()
    # Ctrl-C is how a server is stopped: it shuts down cleanly ("stopped") and exits 0,
    # without the "interrupted" line other commands print.
    assert code == 0, err
    assert "interrupted" not in err
    assert f"127.0.0.1:{server.port}" in err and "stopped" in err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--hide-scrollbars", "--window-size=1280,1000", "--virtual-time-budget=20000"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_page_runs_a_text_query_in_headless_chromium(store_path, service, tmp_path):
    """The page loads, runs the text query in its address, and shows the API's neighbours."""
    expected = service.search(text="pleural effusion", k=12)["hits"]
    server = Server(store_path)
    try:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p'}",
                               "--dump-dom", f"{server.url}/?text=pleural%20effusion&k=12"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NO_PROXY": "127.0.0.1"})
    finally:
        server.stop()
    dom = done.stdout
    assert "12 nearest to" in dom, done.stderr[-2000:]
    for hit in expected:
        assert hit["image_id"] in dom and f"{hit['similarity']:.4f}" in dom
    assert dom.count('class="card"') == 12
    order = [dom.find(h["image_id"] + " · patient") for h in expected]
    assert order == sorted(order)  # shown in the API's rank order

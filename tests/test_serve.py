"""The ``serve`` stage with a real process and sockets: ``POST /predict`` from the newest checkpoint.

The stage runs under the supervisor; the test writes real scikit-learn checkpoints where it reads
them. Answers equal ``model.predict`` / ``predict_proba`` of the version they name, one record or
a list; ``GET /model`` names the version and its last hold-out row; a checkpoint written while two
clients keep posting serves within a second and no request fails during the swap; a garbage
newest checkpoint is skipped while the previous keeps serving; bad bodies get 400 with a reason,
a missing or wrong token 401, a body too large 413, none 411; pipelined requests on a kept-alive
connection and ``Expect: 100-continue`` are answered; the stage keeps its pid and its restart
count of 0 throughout, and once SIGKILLed it is restarted and serves the same version again.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier

from streampipe.stages.builtins import checkpoints
from tests.conftest import wait_for
from tests.servers import free_port
from tests.test_connectors_http import raw  # bytes in, every byte answered until the server closes

TOKEN = "serve-token"
PIPELINE = """
pipeline: serving
defaults: {{heartbeat_timeout: 60}}
stages:
  api:
    type: serve
    options: {{port: {port}, token: {token}, checkpoint_dir: {folder}}}
"""
RNG = np.random.default_rng(11)
W = RNG.normal(0, 1, 8)


def data(n: int) -> tuple[np.ndarray, np.ndarray]:
    X = RNG.normal(0, 1, (n, 8))
    return X, (X @ W > 0).astype(int)


def train(model: SGDClassifier | None, n: int = 2000) -> SGDClassifier:
    X, y = data(n)
    model = model or SGDClassifier(loss="log_loss", random_state=0)
    model.partial_fit(X, y, classes=[0, 1])
    return model


def save(folder: Path, version: int, model: Any) -> None:
    checkpoints.save(folder, version, model, {"features": "x", "n_features": 8, "classes": [0, 1],
                                              "records_seen": version * 2000, "estimator": "sklearn.linear_model.SGDClassifier"})


class Client:
    """One kept-alive connection."""

    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.token = token

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.con.request(method, path, body=payload, headers=headers)
        resp = self.con.getresponse()
        data = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.con.close()
        return resp.status, json.loads(data) if data else None

    def close(self) -> None:
        self.con.close()


def ask(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    """One request on a connection of its own."""
    c = Client(port, token)
    try:
        return c.call(method, path, body)
    finally:
        c.close()


def records(X: np.ndarray) -> list[dict[str, Any]]:
    return [{"id": i, "x": row.tolist()} for i, row in enumerate(X)]


def assert_answers(answers: list[dict[str, Any]], X: np.ndarray, folder: Path) -> None:
    version = answers[0]["model_version"]
    assert all(a["model_version"] == version for a in answers)
    model = checkpoints.load(folder, version).model
    assert [a["prediction"] for a in answers] == model.predict(X).tolist()
    np.testing.assert_allclose([a["probabilities"] for a in answers], model.predict_proba(X), rtol=1e-12, atol=0)


@pytest.mark.timeout(120)
def test_predict_matches_the_checkpoint_and_swaps_live(pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    model = train(None)
    save(folder, 1, model)
    port = free_port()
    p = pipeline(PIPELINE.format(port=port, token=TOKEN, folder=folder))
    p.up()
    wait_for(lambda: ask(port, "GET", "/readyz", token=None)[0] == 200, timeout=60, what="the stage ready")
    pid = p.row("api")["pid"]
    c = Client(port)

    # -- answers: one record, and a list, each what the checkpoint's model says
    X, _ = data(50)
    code, one = c.call("POST", "/predict", records(X[:1])[0])
    assert code == 200 and set(one) == {"prediction", "probabilities", "model_version"}
    assert_answers([one], X[:1], folder)
    code, many = c.call("POST", "/predict", records(X))
    assert code == 200 and len(many) == 50
    assert_answers(many, X, folder)

    # -- /model: the version, its metadata and its last hold-out row from the evaluator's file
    rows = [{"model_version": 1, "records_evaluated": n, "metrics": {"accuracy": 0.9 + n / 1e4}} for n in (100, 200)]
    (p.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, info = c.call("GET", "/model")
    assert code == 200 and info["model_version"] == 1 and info["classes"] == [0, 1] and info["records_seen"] == 2000
    assert info["holdout"]["records_evaluated"] == 200 and info["holdout"]["metrics"]["accuracy"] == 0.92

    # -- bad requests: 400 with a reason, 401, 404, 405; the stage keeps going
    bad = [(b"not json", "not JSON"), (b"[1, 2]", "record 1 is a JSON int"), (b'"x"', "a JSON str"),
           (json.dumps({"x": [1.0, 2.0]}).encode(), "record 1: field 'x': expected 8 values, got 2"),
           (json.dumps([{"x": [0.0] * 8}, {"y": 1}]).encode(), "record 2: missing field 'x'"),
           (json.dumps({"x": ["a"] * 8}).encode(), "non-numeric value 'a'")]
    for body, why in bad:
        code, answer = c.call("POST", "/predict", raw=body)
        assert code == 400 and why in answer["error"], (body, answer)
    assert ask(port, "POST", "/predict", records(X[:1])[0], token=None)[0] == 401
    assert ask(port, "POST", "/predict", records(X[:1])[0], token="wrong")[0] == 401
    assert ask(port, "GET", "/model", token="wrong")[0] == 401
    assert c.call("GET", "/nothing")[0] == 404 and c.call("GET", "/predict")[0] == 405
    assert c.call("POST", "/predict", records(X[:2]))[0] == 200      # the same connection still serves
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    one = json.dumps(records(X[:1])[0]).encode()
    post = b"POST /predict HTTP/1.1\r\nHost: x\r\n" + auth + f"Content-Length: {len(one)}\r\n\r\n".encode() + one
    answers = raw(port, post + post + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")   # pipelined
    assert answers.count(b"HTTP/1.1 200 OK") == 3 and answers.count(b'"model_version":1') == 2
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:   # curl's Expect: 100-continue
        s.sendall(post.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n").split(b"\r\n\r\n")[0] + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(one)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    assert raw(port, b"POST /predict HTTP/1.1\r\n" + auth + b"Content-Length: 99999999\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert raw(port, b"POST /predict HTTP/1.1\r\n" + auth + b"\r\n").startswith(b"HTTP/1.1 411")
    # no token: refused from the head, the body (never sent here) not waited for
    assert raw(port, b"POST /predict HTTP/1.1\r\nContent-Length: 500000\r\n\r\n").startswith(b"HTTP/1.1 401")
    assert raw(port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")

    # -- a swap while two clients keep posting: no request fails, v2 within a second
    log: list[tuple[float, int, int]] = []            # (time answered, status, version)
    per_client: dict[int, list[int]] = {0: [], 1: []}  # each client's versions, in the order it got them
    stop = threading.Event()
    lock = threading.Lock()

    def client(me_id: int) -> None:
        me = Client(port)
        body = records(X[:1])[0]
        while not stop.is_set():
            try:
                code, answer = me.call("POST", "/predict", body)
                version = answer.get("model_version", -1) if code == 200 else -1
            except OSError:
                code, version = -1, -1
            with lock:
                log.append((time.monotonic(), code, version))
                per_client[me_id].append(version)
        me.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(log) > 200, timeout=30, what="requests flowing")
    model2 = train(train(model))
    save(folder, 2, model2)
    saved_at = time.monotonic()
    wait_for(lambda: any(v == 2 for _, _, v in log[-50:]), timeout=10, what="version 2 served")
    first_v2 = min(t for t, _, v in log if v == 2)
    wait_for(lambda: len([1 for t, _, _ in log if t > first_v2]) > 200, timeout=30, what="requests after the swap")
    stop.set()
    for t in threads:
        t.join(15)
    assert all(code == 200 for _, code, _ in log), {code for _, code, _ in log}
    assert {v for _, _, v in log} == {1, 2}
    assert all(vs == sorted(vs) and vs[-1] == 2 for vs in per_client.values())   # the swap does not go back
    took = first_v2 - saved_at
    print(f"\n{len(log)} requests during the swap, all 200; version 2 served {took * 1000:.0f} ms after its commit")
    assert took < 1.0
    code, many = c.call("POST", "/predict", records(X))
    assert_answers(many, X, folder)

    # -- a garbage newest checkpoint: skipped, version 2 keeps serving
    checkpoints.model_path(folder, 3).write_bytes(np.random.default_rng(3).bytes(4000))
    checkpoints.meta_path(folder, 3).write_text(json.dumps({"version": 3, "features": "x"}))
    stage_log = p.run_dir / "logs" / "api.0.jsonl"
    wait_for(lambda: "version 3: joblib.load failed" in stage_log.read_text(), timeout=10, what="the skip logged")
    code, answer = c.call("POST", "/predict", records(X[:1])[0])
    assert code == 200 and answer["model_version"] == 2
    assert c.call("GET", "/model")[1]["skipped_versions"] == [3]

    row = p.row("api")
    assert row["pid"] == pid and row["restarts"] == 0 and row["state"] == "running"
    assert row["stats"]["model_version"] == 2 and row["stats"]["refused"] == len(bad)
    c.close()

    # -- a stage like any other: SIGKILLed, it is restarted and serves the same version again
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: p.row("api")["pid"] != pid and p.row("api")["state"] == "running", timeout=60, what="api back")
    wait_for(lambda: ask(port, "GET", "/readyz", token=None)[0] == 200, timeout=30, what="ready again")
    assert ask(port, "POST", "/predict", records(X[:1])[0])[1]["model_version"] == 2
    assert p.row("api")["restarts"] == 1


@pytest.mark.timeout(60)
def test_not_ready_before_a_checkpoint(pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    port = free_port()
    p = pipeline(PIPELINE.format(port=port, token=TOKEN, folder=folder))
    p.up()
    wait_for(lambda: ask(port, "GET", "/healthz", token=None)[0] == 200, timeout=60, what="the stage up")
    assert ask(port, "GET", "/readyz", token=None)[0] == 503
    code, answer = ask(port, "POST", "/predict", {"x": [0.0] * 8})
    assert code == 503 and "no valid checkpoint" in answer["error"]
    folder.mkdir(exist_ok=True)
    save(folder, 1, train(None))
    wait_for(lambda: ask(port, "GET", "/readyz", token=None)[0] == 200, timeout=10, what="ready once v1 exists")
    assert ask(port, "POST", "/predict", {"x": [0.0] * 8})[1]["model_version"] == 1


def test_an_open_port_needs_a_token(tmp_path: Path) -> None:
    from streampipe.launcher.config import load_config
    from streampipe.launcher.errors import ConfigError

    config = tmp_path / "services.yaml"
    config.write_text("pipeline: p\nstages:\n  api:\n    type: serve\n    options: {host: 0.0.0.0, port: 8099}\n")
    with pytest.raises(ConfigError, match="host 0.0.0.0 opens the serving port") as err:
        load_config(config)
    assert "stages.api.options.host" in str(err.value)
    config.write_text(config.read_text().replace("port: 8099}", "port: 8099, tokn: t}"))
    with pytest.raises(ConfigError, match="did you mean 'token'"):
        load_config(config)
    config.write_text(config.read_text().replace("tokn", "token"))
    load_config(config)

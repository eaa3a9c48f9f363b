import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Tests that pin torch to one thread must not leak it: reference runs in this process are compared with
    subprocess runs, and another thread count changes float summation order."""
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache (trained classifiers) for the whole run, unless DIFFUSERS_STAGES_CACHE points elsewhere."""
    path = os.environ.get("DIFFUSERS_STAGES_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["DIFFUSERS_STAGES_CACHE"] = path
    return path


BAD_TOKEN = "hf_bad"  # the local Hub refuses this token (HTTP 401)


class FakeHub(BaseHTTPRequestHandler):
    """create_repo, preupload (every file 'regular') and commit (ndjson with base64 contents)."""

    store: dict = {}
    repos: list = []

    def _reply(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            if self.headers.get("Authorization") == f"Bearer {BAD_TOKEN}":
                return self._reply({"error": "Invalid credentials in Authorization header"}, 401)
            payload = json.loads(data)
            self.repos.append(payload)
            return self._reply({"url": f"{host}/{payload.get('organization') or 'user'}/{payload['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's metadata check
            self.store["validated-yaml"] = json.loads(data)["content"].encode()
            return self._reply({})
        if "/preupload/" in self.path:
            files = json.loads(data)["files"]
            return self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path:
            for line in data.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.store[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            return self._reply({"commitUrl": f"{host}/user/repo/commit/abc", "commitOid": "a" * 40})
        self._reply({"error": f"unexpected route {self.path}"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    """A local Hub server: yields ``(endpoint, FakeHub)``; `HfApi()` without an endpoint uses it too."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the local server below is ever contacted
    FakeHub.store, FakeHub.repos = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    yield endpoint, FakeHub
    server.shutdown()

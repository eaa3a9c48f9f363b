"""Model card rendering and the Hub upload, against a local HTTP server implementing the routes `upload_folder` uses."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import ModelCard

from diffusers_stages.hub import check_upload_folder, push_to_hub, render_model_card


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
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the local server below is ever contacted
    FakeHub.store, FakeHub.repos = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub
    server.shutdown()


def card(**extra):
    return render_model_card(
        "deme_merged.md",
        tags=["decouple-then-merge", "lora"],
        base_model="tiny/base",
        pipeline_tag="unconditional-image-generation",
        stages=[
            {"stage": 0, "start": 0, "end": 500, "weight": 0.25},
            {"stage": 1, "start": 500, "end": 1000, "weight": 1.0},
        ],
        rank=4,
        lora_alpha=8,
        target_modules=["to_q", "to_v"],
        channel_projection=False,
        training={"max_train_steps": 10},
        metrics={"fid": 12.5},
        **extra,
    )


def test_model_card_has_metadata_and_merge_details(tmp_path):
    c = card()
    c.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "diffusers" and loaded.data.base_model == "tiny/base"
    assert {"decouple-then-merge", "lora"} <= set(loaded.data.tags)
    assert (
        "| 1 | [500, 1000) | 1.0 |" in loaded.text
        and "| fid | 12.5 |" in loaded.text
        and "max_train_steps: 10" in loaded.text
    )
    with pytest.raises(ValueError, match="template"):
        render_model_card("no_such_template.md")


def test_push_to_hub_uploads_the_complete_folder(tmp_path, fake_hub):
    endpoint, hub = fake_hub
    folder = tmp_path / "merged"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="README.md"):
        check_upload_folder(folder)
    card().save(folder / "README.md")
    with pytest.raises(ValueError, match="no safetensors"):
        check_upload_folder(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00weights")
    url = push_to_hub(folder, "user/deme", token="hf_fake", endpoint=endpoint)
    assert url.endswith("/commit/abc") and hub.repos[0]["name"] == "deme"
    assert hub.store["unet/diffusion_pytorch_model.safetensors"] == b"\x00weights"
    assert b"library_name: diffusers" in hub.store.pop("validated-yaml")
    assert set(hub.store) == {
        "README.md",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }

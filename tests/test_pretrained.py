"""Named checkpoints (issue 16): downloads from a local HTTP server on 127.0.0.1 (Range, dropped
connections, wrong checksums), the cache, offline errors, create_model(pretrained=...) and the CLI."""

import hashlib
import http.server
import json
import os
import threading

import pytest
import torch
from cli_helpers import _one_thread  # noqa: F401  (autouse: one torch thread)

import htsat
from htsat import pretrained
from htsat.cli import main

TINY = dict(htsat.TINY_OVERRIDES, spec_size=64, depths=(1, 1, 1, 1), clip_seconds=1.0, long_hop_seconds=0.5, num_classes=7)


class _Server:
    """Serves one payload at /tiny.pt with Range / If-Range support and a strong ETag; ``drop_at`` cuts the next
    responses after that many body bytes (the Content-Length still promises the whole rest); ``ranges`` records
    Range headers. Misbehaviour on demand: ``declare`` (a Content-Length of that many bytes, and only those sent),
    ``no_length`` (no Content-Length), ``content_type`` None (no Content-Type); /redirect answers 302 to /tiny.pt
    with ``redirect_headers`` (the hub's X-Linked-Etag / X-Linked-Size ride on its 302)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.drop_at: int | None = None
        self.drops_left = 0
        self.ranges: list[str | None] = []
        self.if_ranges: list[str | None] = []
        self.linked_etag: str | None = None
        self.content_type: str | None = "application/octet-stream"
        self.etag: str | None = f'"{hashlib.sha256(payload).hexdigest()[:16]}"'
        self.declare: int | None = None
        self.no_length = False
        self.redirect_headers: dict[str, str] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet test output
                pass

            def do_GET(self):
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/tiny.pt")
                    for k, v in server.redirect_headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.ranges.append(self.headers.get("Range"))
                server.if_ranges.append(self.headers.get("If-Range"))
                if self.path != "/tiny.pt":
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and self.headers.get("If-Range") is not None and self.headers.get("If-Range") != server.etag:
                    rng = None  # RFC 9110: the file changed, send all of it
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = server.payload[start:]
                if server.declare is not None:
                    body = body[: server.declare]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                if not server.no_length:
                    self.send_header("Content-Length", str(len(body)))
                if server.content_type is not None:
                    self.send_header("Content-Type", server.content_type)
                if server.etag:
                    self.send_header("ETag", server.etag)
                if server.linked_etag:
                    self.send_header("X-Linked-Etag", f'"{server.linked_etag}"')
                self.end_headers()
                if server.drops_left > 0 and server.drop_at is not None:
                    server.drops_left -= 1
                    self.wfile.write(body[: server.drop_at])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.pt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_payload(tmp_path_factory):
    torch.manual_seed(0)
    model = htsat.create_model("htsat-audioset", **TINY)
    path = tmp_path_factory.mktemp("src") / "tiny.pt"
    htsat.save_checkpoint(model, path)
    return path.read_bytes(), model.state_dict()


@pytest.fixture
def server(tiny_payload):
    with _Server(tiny_payload[0]) as s:
        yield s


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "htsat-home"
    monkeypatch.setenv("HTSAT_HOME", str(home))
    for var in ("HTSAT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return home


def _register(monkeypatch, url, sha256=None, name="test-tiny"):
    entry = pretrained.Pretrained(
        name, "htsat-audioset", "tiny-test.pt", "random weights", "none", "test", url=url, sha256=sha256, overrides=dict(TINY)
    )
    monkeypatch.setitem(pretrained.REGISTRY, name, entry)
    return entry


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("HTSAT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == str(tmp_path / "xdg" / "htsat")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert pretrained.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "htsat")
    monkeypatch.setenv("HTSAT_HOME", str(tmp_path / "h"))
    assert pretrained.cache_dir() == str(tmp_path / "h")


def test_registry_facts():
    reg = pretrained.REGISTRY
    for e in reg.values():
        assert e.preset in htsat.PRESETS, e.name
        assert e.url or e.hub_repo or e.manual, e.name
        assert e.sha256 is None or len(e.sha256) == 64
    assert [reg[f"htsat-audioset-{i}"].filename for i in (1, 2, 6)] == [
        "HTSAT_AudioSet_Saved_1.ckpt",
        "HTSAT_AudioSet_Saved_2.ckpt",
        "HTSAT_AudioSet_Saved_6.ckpt",
    ]
    assert reg["htsat-audioset"].url.startswith(
        "https://drive.usercontent.google.com/download?id=1OK8a5XuMVLyeVKF117L8pfxeZYdfSDZv"
    )
    assert reg["clap-htsat-tiny"].download_url == "https://huggingface.co/lukewys/laion_clap/resolve/main/630k-audioset-best.pt"
    assert reg["clap-htsat-base"].preset == "clap-htsat-base" and reg["htsat-scv2"].overrides == {"cap_fmax": False}


def test_download_and_load(server, cache, monkeypatch, tiny_payload):
    payload, state = tiny_payload
    _register(monkeypatch, server.url, sha256=hashlib.sha256(payload).hexdigest())
    path = pretrained.download("test-tiny", progress=False)
    assert path == str(cache / "tiny-test.pt") and open(path, "rb").read() == payload
    assert not os.path.exists(path + ".part")
    model = htsat.create_model(pretrained="test-tiny")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # cached: the second load makes no request
    n = len(server.ranges)
    htsat.create_model("test-tiny", pretrained=True)
    assert len(server.ranges) == n
    # num_classes: the head is skipped (fine-tuning), the rest loaded
    model = htsat.create_model(pretrained="test-tiny", num_classes=3)
    assert model.state_dict()["tscam_conv.weight"].shape[0] == 3
    key = "patch_embed.proj.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_interrupted_download_resumes_with_range(server, cache, monkeypatch, tiny_payload):
    payload = tiny_payload[0]
    _register(monkeypatch, server.url, sha256=hashlib.sha256(payload).hexdigest())
    server.drop_at, server.drops_left = len(payload) // 3, 1
    with pytest.raises(pretrained.DownloadError, match="interrupted after .* run again to resume"):
        pretrained.download("test-tiny", progress=False, retries=0, timeout=10)
    part = cache / "tiny-test.pt.part"
    assert part.stat().st_size == len(payload) // 3 and not (cache / "tiny-test.pt").exists()
    monkeypatch.setenv("HTSAT_OFFLINE", "1")
    with pytest.raises(pretrained.DownloadError, match="not in the cache"):  # a .part is never loaded
        htsat.create_model(pretrained="test-tiny")
    monkeypatch.delenv("HTSAT_OFFLINE")
    path = pretrained.download("test-tiny", progress=False, retries=0, timeout=10)
    assert server.ranges[-1] == f"bytes={len(payload) // 3}-"
    assert open(path, "rb").read() == payload and not part.exists()


def test_dropped_connection_retried_within_one_call(server, cache, monkeypatch, tiny_payload):
    payload = tiny_payload[0]
    _register(monkeypatch, server.url)  # no registry checksum: the server's X-Linked-Etag is used
    server.linked_etag = hashlib.sha256(payload).hexdigest()
    server.drop_at, server.drops_left = 1000, 2
    path = pretrained.download("test-tiny", progress=False, retries=2, timeout=10)
    assert open(path, "rb").read() == payload
    assert server.ranges == [None, "bytes=1000-", "bytes=2000-"]


def test_complete_part_restarts_after_416(server, cache, monkeypatch, tiny_payload):
    payload = tiny_payload[0]
    _register(monkeypatch, server.url, sha256=hashlib.sha256(payload).hexdigest())
    cache.mkdir(parents=True)
    (cache / "tiny-test.pt.part").write_bytes(payload + b"junk")  # longer than the file: the server answers 416
    (cache / "tiny-test.pt.part.meta").write_text(json.dumps({"url": server.url, "validator": server.etag}))
    path = pretrained.download("test-tiny", progress=False, retries=0)
    assert open(path, "rb").read() == payload and server.ranges == [f"bytes={len(payload) + 4}-", None]


def test_wrong_checksum_rejected(server, cache, monkeypatch):
    _register(monkeypatch, server.url, sha256="0" * 64)
    with pytest.raises(pretrained.DownloadError, match="sha256 mismatch .* file discarded"):
        pretrained.download("test-tiny", progress=False)
    assert not (cache / "tiny-test.pt").exists() and not (cache / "tiny-test.pt.part").exists()
    server.linked_etag = "f" * 64  # a published hub checksum that does not match is refused too
    _register(monkeypatch, server.url)
    with pytest.raises(pretrained.DownloadError, match="sha256 mismatch"):
        pretrained.download("test-tiny", progress=False)
    assert not (cache / "tiny-test.pt").exists() and not (cache / "tiny-test.pt.part").exists()


def test_offline_never_touches_the_network(server, cache, monkeypatch, tiny_payload):
    _register(monkeypatch, server.url)
    for var in ("HTSAT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(pretrained.DownloadError) as info:
            htsat.create_model(pretrained="test-tiny")
        msg = str(info.value)
        assert "\n" not in msg and "downloads are off" in msg and f"put it at {cache / 'tiny-test.pt'}" in msg
        monkeypatch.delenv(var)
    assert server.ranges == []
    # a file put there by hand is used offline
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "tiny-test.pt").write_bytes(tiny_payload[0])
    monkeypatch.setenv("HTSAT_OFFLINE", "1")
    htsat.create_model(pretrained="test-tiny")
    assert server.ranges == []


def test_unreachable_and_manual_sources(cache, monkeypatch):
    _register(monkeypatch, "http://127.0.0.1:9/nothing.pt")  # port 9 (discard): connection refused
    with pytest.raises(
        pretrained.DownloadError,
        match=r"cannot download http://127.0.0.1:9/nothing.pt \(.*\); download tiny-test.pt from .* put it at .*tiny-test.pt",
    ):
        pretrained.download("test-tiny", progress=False, retries=0, timeout=5)
    with pytest.raises(pretrained.DownloadError, match=r"cannot be downloaded automatically; download HTSAT_AudioSet_Saved_1"):
        htsat.create_model("htsat-audioset", pretrained="htsat-audioset-1")
    with pytest.raises(ValueError, match="unknown pretrained checkpoint 'nope'"):
        htsat.create_model(pretrained="nope")
    with pytest.raises(ValueError, match="is a clap-htsat-tiny checkpoint"):
        htsat.create_model("htsat-esc50", pretrained="clap-htsat-tiny")


def test_web_page_instead_of_file(server, cache, monkeypatch):
    server.content_type = "text/html; charset=utf-8"  # what Google Drive sends past its quota
    _register(monkeypatch, server.url)
    with pytest.raises(pretrained.DownloadError, match="sent a web page, not the file .* put it at"):
        pretrained.download("test-tiny", progress=False)
    assert not (cache / "tiny-test.pt").exists() and not (cache / "tiny-test.pt.part").exists()


def test_http_404_is_one_line(server, cache, monkeypatch):
    _register(monkeypatch, server.url.replace("tiny.pt", "missing.pt"))
    with pytest.raises(pretrained.DownloadError, match="HTTP 404"):
        pretrained.download("test-tiny", progress=False)


def test_cli_models_and_download(server, cache, monkeypatch, capsys, tiny_payload):
    _register(monkeypatch, server.url, sha256=hashlib.sha256(tiny_payload[0]).hexdigest())
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("htsat-audioset", "htsat-esc50", "htsat-scv2", "clap-htsat-tiny", "clap-htsat-base-music-speech", "test-tiny"):
        assert name in out
    assert "manual (Google Drive)" in out and "Google Drive file" in out and "hub" in out
    assert main(["models", "--long"]) == 0
    assert "zero-shot ESC-50 89.98 %" in capsys.readouterr().out

    assert main(["download", "test-tiny", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "tiny-test.pt")
    assert main(["models"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("test-tiny")][0].split()[4] == "yes"

    assert main(["download", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("htsat: error: unknown pretrained checkpoint 'nope'") and err.count("\n") == 1
    assert main(["download", "htsat-esc50"]) == 1  # no download link: a manual entry
    err = capsys.readouterr().err
    assert "drive.google.com" in err and "put it at" in err and err.count("\n") == 1 and "Traceback" not in err
    other = pretrained.Pretrained("test-other", "htsat-audioset", "other.pt", "-", "-", "test", url=server.url)
    monkeypatch.setitem(pretrained.REGISTRY, "test-other", other)
    monkeypatch.setenv("HTSAT_OFFLINE", "1")
    assert main(["download", "test-other"]) == 1
    err = capsys.readouterr().err
    assert "downloads are off" in err and err.count("\n") == 1 and not (cache / "other.pt").exists()


def test_progress_bar_on_stderr(server, cache, monkeypatch, capsys):
    _register(monkeypatch, server.url)
    pretrained.download("test-tiny", progress=True)
    captured = capsys.readouterr()
    assert "tiny-test.pt" in captured.err and captured.out == ""


@pytest.mark.parametrize("hf_hub", [False, True])
def test_hub_entry_offline(cache, monkeypatch, tmp_path, hf_hub):
    if hf_hub:
        pytest.importorskip("huggingface_hub")
        monkeypatch.delenv("HTSAT_NO_HF_HUB", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    else:
        monkeypatch.setenv("HTSAT_NO_HF_HUB", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pretrained.DownloadError) as info:
        pretrained.download("clap-htsat-tiny-630k", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "downloads are off" in msg
    assert "https://huggingface.co/lukewys/laion_clap/resolve/main/630k-best.pt" in msg
    assert f"put it at {cache / '630k-best.pt'}" in msg


def test_concurrent_downloads_fetch_once(server, cache, monkeypatch, tiny_payload):
    _register(monkeypatch, server.url, sha256=hashlib.sha256(tiny_payload[0]).hexdigest())
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(pretrained.download("test-tiny", progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert paths == [str(cache / "tiny-test.pt")] * 3 and len(server.ranges) == 1
    assert open(paths[0], "rb").read() == tiny_payload[0]


def test_scv2_entry_builds_the_original_filterbank(cache, monkeypatch):
    """The original SCV2 model kept fmax 14000 at 16 kHz; its entry carries cap_fmax=False, so an original-layout
    file put in the cache by hand loads (its mel weights are checked against ours)."""
    with pytest.warns(UserWarning, match="kept as asked"):
        original = htsat.create_model("htsat-scv2", cap_fmax=False)
    cache.mkdir(parents=True)
    lightning = {"state_dict": {f"sed_model.{k}": v for k, v in original.state_dict().items()}}
    torch.save(lightning, cache / "HTSAT_SCV2_Saved_2.ckpt")
    monkeypatch.setenv("HTSAT_OFFLINE", "1")
    with pytest.warns(UserWarning, match="kept as asked"):
        model = htsat.create_model("htsat-scv2", pretrained=True)
    assert model.config.fmax == 14000.0 and model.config.num_classes == 35
    key = "layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], original.state_dict()[key])


def test_predictor_and_cli_take_a_registry_name(server, cache, monkeypatch, tiny_payload, tmp_path, capsys):
    """`htsat predict --checkpoint NAME`: the registry file (downloaded once, then cached) with its saved config."""
    import numpy as np
    import soundfile as sf

    from htsat.cli import main
    from htsat.predict import Predictor

    _register(monkeypatch, server.url, sha256=hashlib.sha256(tiny_payload[0]).hexdigest())
    pred = Predictor.from_checkpoint("test-tiny", device="cpu")
    assert pred.model.config.embed_dim == TINY["embed_dim"] and os.path.isfile(cache / "tiny-test.pt")
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.3 * np.sin(np.arange(16000 * 2) * 0.2).astype(np.float32), 16000)
    n = len(server.ranges)
    assert main(["predict", str(wav), "--checkpoint", "test-tiny", "--json", "--num-workers", "0", "--no-progress"]) == 0
    assert len(server.ranges) == n  # cached: no second download
    assert '"top"' in capsys.readouterr().out


def test_predictor_registry_name_of_an_original_file_uses_the_entry_preset(cache, monkeypatch):
    """An original-layout file of the registry (put in the cache by hand) loads with the entry's preset and
    overrides (SCV2: cap_fmax=False, fmax 14000 at 16 kHz)."""
    from htsat.predict import Predictor

    with pytest.warns(UserWarning, match="kept as asked"):
        original = htsat.create_model("htsat-scv2", cap_fmax=False)
    cache.mkdir(parents=True)
    torch.save({"state_dict": {f"sed_model.{k}": v for k, v in original.state_dict().items()}}, cache / "HTSAT_SCV2_Saved_2.ckpt")
    monkeypatch.setenv("HTSAT_OFFLINE", "1")
    with pytest.warns(UserWarning, match="kept as asked"):
        pred = Predictor.from_checkpoint("htsat-scv2", device="cpu")
    assert pred.model.config.fmax == 14000.0 and pred.model.config.num_classes == 35


# -------------------------------------------------------------------------------------------------
# a file enters the cache only when it verifies, and is checked each time it is used
# -------------------------------------------------------------------------------------------------


def _refused(cache, match):
    with pytest.raises(pretrained.DownloadError, match=match) as info:
        pretrained.download("test-tiny", progress=False, retries=0, timeout=10)
    assert "\n" not in str(info.value)
    assert not (cache / "tiny-test.pt").exists() and not (cache / "tiny-test.pt.part").exists()


def test_server_declaring_and_sending_half_the_file_is_refused(server, cache, monkeypatch, tiny_payload):
    _register(monkeypatch, server.url)  # no checksum anywhere: only the archive itself can tell
    server.declare = len(tiny_payload[0]) // 2
    _refused(cache, r"did not give a readable checkpoint \(its archive does not open, truncated or damaged")


def test_no_content_length_and_an_early_close_is_refused(server, cache, monkeypatch, tiny_payload):
    _register(monkeypatch, server.url)
    server.no_length, server.drop_at, server.drops_left = True, len(tiny_payload[0]) // 2, 1
    _refused(cache, "did not give a readable checkpoint")


@pytest.mark.parametrize("content_type", ["Text/HTML", None, "application/octet-stream"])
def test_web_page_is_sniffed_by_content(cache, monkeypatch, content_type):
    page = b"\n<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>...</body></html>"
    with _Server(page) as s:
        s.content_type = content_type
        _register(monkeypatch, s.url)
        _refused(cache, "sent a web page, not the file .* put it at")


def test_stale_foreign_part_is_not_spliced(server, cache, monkeypatch, tiny_payload):
    payload = tiny_payload[0]
    _register(monkeypatch, server.url)
    cache.mkdir(parents=True)
    part = cache / "tiny-test.pt.part"
    foreign = bytes(reversed(payload))[: len(payload) // 3]
    part.write_bytes(foreign)  # left by something else: no record of where it came from
    path = pretrained.download("test-tiny", progress=False, retries=0)
    assert open(path, "rb").read() == payload and server.ranges == [None]
    # one begun from an earlier version of the file: If-Range names that version, the server sends it all again
    os.unlink(path)
    part.write_bytes(foreign)
    (cache / "tiny-test.pt.part.meta").write_text(json.dumps({"url": server.url, "validator": '"an-older-version"'}))
    path = pretrained.download("test-tiny", progress=False, retries=0)
    assert open(path, "rb").read() == payload
    assert server.ranges[-1] == f"bytes={len(foreign)}-" and server.if_ranges[-1] == '"an-older-version"'
    assert not part.exists() and not (cache / "tiny-test.pt.part.meta").exists()


def test_hub_checksum_and_size_on_a_redirect_are_checked(server, cache, monkeypatch, tiny_payload):
    payload = tiny_payload[0]
    redirect = server.url.replace("/tiny.pt", "/redirect")
    _register(monkeypatch, redirect)
    server.redirect_headers = {"X-Linked-Etag": f'"{"f" * 64}"'}
    _refused(cache, f"sha256 mismatch for {redirect} .* expected {'f' * 64}")
    server.redirect_headers = {"X-Linked-Etag": f'"{hashlib.sha256(payload).hexdigest()}"', "X-Linked-Size": "12345"}
    _refused(cache, rf"gave {len(payload)} bytes, the hub \(X-Linked-Size\) says 12345")
    server.redirect_headers["X-Linked-Size"] = str(len(payload))
    assert open(pretrained.download("test-tiny", progress=False), "rb").read() == payload


def _flip_a_weight(path, state):
    """Bits of one stored float changed in place, as disk rot would: patch_embed.proj.weight[0,0,0,0] becomes huge."""
    data = bytearray(open(path, "rb").read())
    raw = state["patch_embed.proj.weight"].numpy().tobytes()
    at = data.find(raw[:16])
    assert at > 0
    data[at + 3] = 0x68  # the exponent byte of the first float
    open(path, "wb").write(bytes(data))


def test_damaged_cache_is_detected_and_download_force_repairs_it(server, cache, monkeypatch, tiny_payload, capsys):
    payload, state = tiny_payload
    _register(monkeypatch, server.url)
    path = pretrained.download("test-tiny", progress=False)
    assert (cache / "tiny-test.pt.sha256").read_text() == f"{hashlib.sha256(payload).hexdigest()}  tiny-test.pt\n"
    _flip_a_weight(path, state)
    with pytest.raises(pretrained.DownloadError) as info:
        htsat.create_model(pretrained="test-tiny")
    msg = str(info.value)
    assert f"cached file {path} is damaged: its sha256" in msg and "recorded at download" in msg and "\n" not in msg
    assert msg.endswith("delete it, or download it again with htsat download --force test-tiny")
    with pytest.raises(htsat.CheckpointError, match=rf"{path}: damaged: its sha256 differs from the one recorded"):
        htsat.load_checkpoint(htsat.create_model("htsat-audioset", **TINY), path)  # the path itself, as printed
    assert main(["download", "test-tiny", "--no-progress"]) == 1  # never reported as cached
    captured = capsys.readouterr()
    assert captured.out == "" and "is damaged" in captured.err and captured.err.count("\n") == 1
    n = len(server.ranges)
    assert main(["download", "test-tiny", "--force", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == path and len(server.ranges) == n + 1
    assert open(path, "rb").read() == payload
    model = htsat.create_model(pretrained="test-tiny")
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], state["patch_embed.proj.weight"])


def test_hand_placed_file_is_checked_then_adopted(server, cache, monkeypatch, tiny_payload, capsys):
    payload = tiny_payload[0]
    _register(monkeypatch, server.url)
    cache.mkdir(parents=True)
    (cache / "tiny-test.pt").write_bytes(payload[: len(payload) // 2])  # a truncated copy put there by hand
    assert main(["download", "test-tiny", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cached file" in err and "is not a readable checkpoint" in err and "htsat download --force test-tiny" in err
    assert server.ranges == []  # a cached file is never replaced unasked
    (cache / "tiny-test.pt").write_bytes(payload)
    monkeypatch.setenv("HTSAT_OFFLINE", "1")
    assert main(["download", "test-tiny"]) == 0
    assert (cache / "tiny-test.pt.sha256").read_text().split()[0] == hashlib.sha256(payload).hexdigest()


def test_failed_force_download_keeps_the_cached_file(server, cache, monkeypatch, tiny_payload):
    payload = tiny_payload[0]
    _register(monkeypatch, server.url)
    path = pretrained.download("test-tiny", progress=False)
    server.declare = len(payload) // 2
    with pytest.raises(pretrained.DownloadError, match="did not give a readable checkpoint"):
        pretrained.download("test-tiny", progress=False, force=True)
    assert open(path, "rb").read() == payload and pretrained.download("test-tiny") == path


def test_server_without_validator_restarts_instead_of_resuming(server, cache, monkeypatch, tiny_payload):
    """No ETag or Last-Modified: nothing shows the rest belongs to the same file, so the next call starts over."""
    payload = tiny_payload[0]
    _register(monkeypatch, server.url)
    server.etag, server.drop_at, server.drops_left = None, 1000, 1
    with pytest.raises(pretrained.DownloadError, match="interrupted after 1000 bytes .* run again to start over"):
        pretrained.download("test-tiny", progress=False, retries=0, timeout=10)
    path = pretrained.download("test-tiny", progress=False, retries=0, timeout=10)
    assert open(path, "rb").read() == payload and server.ranges == [None, None]

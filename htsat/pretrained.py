"""Named pretrained checkpoints: where each comes from, a download cache, ``htsat download`` / ``htsat models``.

``htsat.create_model("htsat-audioset", pretrained=True)`` (or ``pretrained="NAME"``) builds the entry's
preset and loads its file through ``htsat.load_checkpoint``. Files live in ``$HTSAT_HOME`` (default
``$XDG_CACHE_HOME/htsat``, else ``~/.cache/htsat``); hub files go through ``huggingface_hub`` when it is
installed (its own cache and checks), else through plain HTTP(S) from the hub's resolve URL.

A download writes ``<file>.part`` next to the final name and renames it only when it is complete and
its sha256 matches (the registry's, else the one the hub publishes in ``X-Linked-Etag`` for LFS
files); an interrupted ``.part`` is resumed with an HTTP Range request; a ``.part`` is never loaded.
``HTSAT_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network.

The original HTS-AT checkpoints are in the authors' Google Drive folder, which offers no stable direct
URL: those entries say so, and the error tells the user where to get the file and where to put it. The
exception is the AudioSet model the authors' own ESC-50 notebook fetches by file id: it is downloaded
from Drive's direct-download URL, and when Drive answers with a web page instead (its quota, a
confirmation) the error says where to get the file by hand.
Facts (file names, metrics, licences) are from the upstream READMEs and issues; sizes and checksums
are left as None where the source does not publish them (never guessed).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import recorded_sha256, sha256_of

__all__ = [
    "DownloadError",
    "Pretrained",
    "REGISTRY",
    "cache_dir",
    "download",
    "get",
    "load_pretrained",
]

HTSAT_DRIVE = "https://drive.google.com/drive/folders/1f5VYMk0uos_YnuBshgmaTVioXbs7Kmz6"
HTSAT_LICENCE = "MIT (the HTS-AT repository's licence)"
CLAP_REPO = "lukewys/laion_clap"
CLAP_LICENCE = "CC0-1.0 (the LAION-AI/CLAP repository's licence)"
_CHUNK = 1 << 20


class DownloadError(OSError):
    """A checkpoint that could not be fetched or checked; the message names the file and where to put it."""


class _WebPage(Exception):
    """The server answered with an HTML page instead of the file."""


@dataclass(frozen=True)
class Pretrained:
    name: str
    preset: str  # the HTSATConfig preset it loads into
    filename: str
    trained_on: str
    metric: str  # the reported figure, with where it is reported
    licence: str
    url: str | None = None  # direct HTTP(S) download
    hub_repo: str | None = None  # Hugging Face hub repo (and hub_filename in it), fetched by huggingface_hub
    hub_filename: str | None = None
    hub_revision: str = "main"
    manual: str | None = None  # no programmatic download: where a person gets the file
    size_bytes: int | None = None  # None: not published
    sha256: str | None = None  # None: not published (the hub's own LFS checksum is used when it sends one)
    overrides: dict[str, Any] = field(default_factory=dict)  # HTSATConfig fields the checkpoint needs
    note: str = ""

    @property
    def source(self) -> str:
        if self.hub_repo:
            return f"hub {self.hub_repo}/{self.hub_filename or self.filename}"
        return self.url or f"manual: {self.manual}"

    @property
    def download_url(self) -> str | None:
        if self.url:
            return self.url
        if self.hub_repo:
            return f"https://huggingface.co/{self.hub_repo}/resolve/{self.hub_revision}/{self.hub_filename or self.filename}"
        return None


def _htsat(name: str, preset: str, filename: str, subfolder: str, trained_on: str, metric: str, **kw) -> Pretrained:
    manual = f"the authors' Google Drive folder {HTSAT_DRIVE} (subfolder {subfolder}; a browser or gdown)"
    return Pretrained(name, preset, filename, trained_on, metric, HTSAT_LICENCE, manual=manual, **kw)


def _clap(name: str, preset: str, filename: str, trained_on: str, metric: str) -> Pretrained:
    return Pretrained(name, preset, filename, trained_on, metric, CLAP_LICENCE, hub_repo=CLAP_REPO)


_AUDIOSET_DATA = "AudioSet (balanced sampler, Swin-T ImageNet init)"
_AUDIOSET_METRIC = (
    "AudioSet eval mAP 0.471 (paper, single model; 0.487 for an ensemble of six, as the original's config.py ensembles the six released files); "
    "each released checkpoint about 0.465-0.473 (author, upstream issue #44)"
)
# the one original checkpoint with a file link: the authors' ESC-50 notebook (htsat_esc_training.ipynb) fetches it by id
_AUDIOSET_DRIVE_ID = "1OK8a5XuMVLyeVKF117L8pfxeZYdfSDZv"
_ENTRIES = [
    Pretrained(
        "htsat-audioset", "htsat-audioset", "htsat_audioset_pretrain.ckpt", _AUDIOSET_DATA, _AUDIOSET_METRIC, HTSAT_LICENCE,
        note="the AudioSet model the authors' ESC-50 notebook starts from (its name for the file); third-party scripts "
        "save it as HTSAT_AudioSet_Saved_1.ckpt, which the authors do not confirm",
        url=f"https://drive.usercontent.google.com/download?id={_AUDIOSET_DRIVE_ID}&export=download&confirm=t",
        manual=f"https://drive.google.com/file/d/{_AUDIOSET_DRIVE_ID}/view (or the folder {HTSAT_DRIVE}, subfolder AudioSet)",
    ),
    *[
        _htsat(f"htsat-audioset-{i}", "htsat-audioset", f"HTSAT_AudioSet_Saved_{i}.ckpt", "AudioSet",
               _AUDIOSET_DATA, _AUDIOSET_METRIC, note=f"released checkpoint {i} of the six of the ensemble")
        for i in range(1, 7)
    ],
    _htsat("htsat-esc50", "htsat-esc50", "HTSAT_ESC_exp=1_fold=1_acc=0.985.ckpt", "ESC",
           "ESC-50, fine-tuned from the AudioSet model, one model of the 5-fold cross-validation (esc_fold=1)",
           "ESC-50 accuracy 0.985 on its held-out fold (file name); paper: 97.0 +- 0.2 % over the 5 folds"),
    # the original SCV2 model kept fmax 14000 at 16 kHz: its mel filterbank needs cap_fmax=False
    _htsat("htsat-scv2", "htsat-scv2", "HTSAT_SCV2_Saved_2.ckpt", "SCV2", "Speech Commands V2 (35 words, 16 kHz)",
           "SCV2 test accuracy 98.0 +- 0.03 % (paper)", overrides={"cap_fmax": False}),
    _clap("clap-htsat-tiny", "clap-htsat-tiny", "630k-audioset-best.pt", "LAION-Audio-630K + AudioSet (laion-clap's default "
          "non-fusion model)", "zero-shot ESC-50 (first official fold) R@1 0.9275, mAP@10 0.9556 (LAION-AI/CLAP README)"),
    _clap("clap-htsat-tiny-630k", "clap-htsat-tiny", "630k-best.pt", "LAION-Audio-630K",
          "best mean retrieval mAP@10 (AudioCaps, Clotho) of its run; no single figure in the README"),
    _clap("clap-htsat-base", "clap-htsat-base", "music_speech_audioset_epoch_15_esc_89.98.pt",
          "music + speech + AudioSet + LAION-Audio-630K (about 4M clips)", "zero-shot ESC-50 89.98 %, GTZAN 73 % (README)"),
    _clap("clap-htsat-base-music", "clap-htsat-base", "music_audioset_epoch_15_esc_90.14.pt",
          "music + AudioSet + LAION-Audio-630K", "zero-shot ESC-50 90.14 %, GTZAN 64 % (README)"),
    _clap("clap-htsat-base-music-speech", "clap-htsat-base", "music_speech_epoch_15_esc_89.25.pt",
          "music + speech + LAION-Audio-630K", "zero-shot ESC-50 89.25 %, GTZAN 73 % (README)"),
]  # fmt: skip
REGISTRY: dict[str, Pretrained] = {e.name: e for e in _ENTRIES}


def get(name: str) -> Pretrained:
    if name not in REGISTRY:
        raise ValueError(f"unknown pretrained checkpoint {name!r}; known: {', '.join(REGISTRY)} (htsat models lists them)")
    return REGISTRY[name]


def cache_dir() -> str:
    """``$HTSAT_HOME``, else ``$XDG_CACHE_HOME/htsat``, else ``~/.cache/htsat`` (as torch.hub and huggingface_hub do)."""
    home = os.environ.get("HTSAT_HOME")
    if home:
        return os.path.expanduser(home)
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "htsat")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HTSAT_OFFLINE", "HF_HUB_OFFLINE"))


def _where_from(entry: Pretrained) -> str:
    return entry.manual or entry.download_url or "?"  # a page a person can open first, when there is one


def download(
    name_or_entry: str | Pretrained,
    *,
    progress: bool | None = None,
    timeout: float = 60.0,
    retries: int = 2,
    force: bool = False,
) -> str:
    """The local path of a registry checkpoint, downloading it first when it is not cached.

    A cached file is checked before it is returned: against the sha256 recorded beside it at download
    (``<file>.sha256``, or the registry's); a file put there by hand must be a readable checkpoint, and its
    sha256 is then recorded. ``force=True`` downloads it again (the old file stays until the new one is checked).
    Raises DownloadError (one line: what failed, and which file to put where) and ValueError for an unknown name.
    """
    entry = get(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    dest = os.path.join(cache_dir(), entry.filename)
    if os.path.isfile(dest) and not force:
        _check_cached(entry, dest)
        return dest
    put = f"download {entry.filename} from {_where_from(entry)} and put it at {dest}"
    if entry.hub_repo and _have_hf_hub():
        return _hub_download(entry, dest, put, force=force)
    if offline():
        raise DownloadError(
            f"{entry.name}: {entry.filename} is not in the cache and downloads are off (HTSAT_OFFLINE / HF_HUB_OFFLINE); {put}"
        )
    url = entry.download_url
    if url is None:
        raise DownloadError(f"{entry.name}: {entry.filename} cannot be downloaded automatically; {put}")
    show = sys.stderr.isatty() if progress is None else progress
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with _locked(dest + ".lock"):  # two processes appending to one .part would corrupt it
        if force:
            _discard(dest + ".part")  # asked to start over: nothing of an earlier attempt is reused
            _http_download(url, dest, entry, show=show, timeout=timeout, retries=retries, put=put)
        elif os.path.isfile(dest):  # another process finished it meanwhile
            _check_cached(entry, dest)
        else:
            _http_download(url, dest, entry, show=show, timeout=timeout, retries=retries, put=put)
    return dest


@contextlib.contextmanager
def _locked(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _have_hf_hub() -> bool:
    if os.environ.get("HTSAT_NO_HF_HUB"):  # force the plain HTTP path (tests, or a broken hub install)
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _hub_download(entry: Pretrained, dest: str, put: str, *, force: bool = False) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(
            entry.hub_repo,
            entry.hub_filename or entry.filename,
            revision=entry.hub_revision,
            local_files_only=offline(),
            force_download=force,
        )
    except Exception as exc:  # the hub's errors (offline, no network, missing file) differ across versions
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = "not in the hub cache and downloads are off (HTSAT_OFFLINE / HF_HUB_OFFLINE)" if offline() else first
        raise DownloadError(f"{entry.name}: {entry.filename}: {why}; {put}") from exc


# -------------------------------------------------------------------------------------------------
# what a file must be to enter the cache, and stay there
# -------------------------------------------------------------------------------------------------


class _Unreadable(Exception):
    """The file is not a readable checkpoint; the message says why."""


def _discard(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _record_sha256(dest: str, sha: str) -> None:
    """``<file>.sha256`` beside the cached file (``sha256sum -c`` reads it), written atomically; a read-only cache
    is left as it is (the file is then checked for readability each time instead)."""
    tmp = f"{dest}.sha256.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{sha}  {os.path.basename(dest)}\n")
        os.replace(tmp, dest + ".sha256")
    except OSError:
        _discard(tmp)


def _looks_like_html(head: bytes) -> bool:
    """A web page or other markup by its first bytes, whatever its Content-Type says (no checkpoint starts with '<')."""
    text = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<")


def _has_tensor(obj: Any, depth: int = 0) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if depth > 4:
        return False
    if isinstance(obj, dict):
        return any(_has_tensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v, depth + 1) for v in obj)
    return False


def _verify_checkpoint(path: str) -> None:
    """Raise _Unreadable unless ``path`` is a torch.save file whose archive opens, passes its CRC checks and lists
    tensors (read with weights_only=True, memory-mapped: nothing is unpickled beyond plain data)."""
    import torch

    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise _Unreadable("empty file")
    if _looks_like_html(head):
        raise _Unreadable("it is a web page or other markup, not a checkpoint")
    mmap = head.startswith(b"PK\x03\x04")
    if mmap:
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _Unreadable(f"its archive does not open, truncated or damaged ({exc})") from None
        if damaged is not None:
            raise _Unreadable(f"archive member {damaged} fails its CRC check (damaged)")
        if not any(n.endswith("data.pkl") for n in names):
            raise _Unreadable("a zip archive without data.pkl, not a torch.save file")
    elif not head.startswith(b"\x80"):  # neither torch.save's zip nor a legacy pickle
        raise _Unreadable(f"not a PyTorch checkpoint (starts with {head[:8]!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise _Unreadable(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
    if not _has_tensor(obj):
        raise _Unreadable("it holds no tensors")


def _check_cached(entry: Pretrained, dest: str) -> None:
    """A cached file matches the sha256 recorded at download (or the registry's); one without a record is adopted
    when it is a readable checkpoint. DownloadError otherwise, saying how to get a good copy."""
    again = f"delete it, or download it again with htsat download --force {entry.name}"
    expected = entry.sha256.lower() if entry.sha256 else recorded_sha256(dest)
    if expected is None:  # put there by hand, or cached before checksums were recorded
        try:
            _verify_checkpoint(dest)
        except _Unreadable as exc:
            raise DownloadError(f"{entry.name}: cached file {dest} is not a readable checkpoint ({exc}); {again}") from None
        _record_sha256(dest, sha256_of(dest))
        return
    got = sha256_of(dest)
    if got != expected:
        whose = "the registry's" if entry.sha256 else f"the one recorded at download in {dest}.sha256"
        raise DownloadError(
            f"{entry.name}: cached file {dest} is damaged: its sha256 {got} differs from {whose} ({expected}); {again}"
        )


# -------------------------------------------------------------------------------------------------
# plain HTTP(S)
# -------------------------------------------------------------------------------------------------


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of every redirect answer: the hub sends X-Linked-Etag / X-Linked-Size on its 302 to the
    storage URL, whose own answer does not carry them."""

    def __init__(self):
        self.hops: list[Any] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class _Fetched:
    sha256: str | None  # the hub's, from X-Linked-Etag on any hop
    sizes: dict[str, int]  # what each source states the length to be


def _published_sha256(hops: list[Any]) -> str | None:
    """The hub's resolve answer carries an LFS file's sha256 in X-Linked-Etag; other servers: None."""
    for headers in hops:
        tag = (headers.get("X-Linked-Etag") or "").strip().strip('"')
        if re.fullmatch(r"[0-9a-fA-F]{64}", tag):
            return tag.lower()
    return None


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _http_download(url: str, dest: str, entry: Pretrained, *, show: bool, timeout: float, retries: int, put: str) -> None:
    part = dest + ".part"
    last = ""
    for _attempt in range(retries + 1):
        try:
            fetched = _fetch_into(url, part, entry, show=show, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"{entry.name}: cannot download {url} (HTTP {exc.code} {exc.reason}); {put}") from None
        except _WebPage:
            _discard(part, part + ".meta")
            raise DownloadError(
                f"{entry.name}: {url} sent a web page, not the file (Google Drive does so past its download quota or to "
                f"ask for a confirmation); {put}"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            last = f"{type(exc).__name__}: {reason}" if not str(reason) else str(reason)
            continue  # the .part keeps what arrived: the next attempt resumes it
        _accept(part, dest, url, entry, fetched, put)
        return
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if not have:
        raise DownloadError(f"{entry.name}: cannot download {url} ({last}); {put}")
    origin = _part_origin(part) or {}
    again = (
        f"run again to resume from {part}"
        if origin.get("validator")
        else "run again to start over (the server names no version of the file, so a resume could splice two)"
    )
    raise DownloadError(f"{entry.name}: download of {url} interrupted after {have} bytes ({last}); {again}, or {put}")


def _accept(part: str, dest: str, url: str, entry: Pretrained, fetched: _Fetched, put: str) -> None:
    """Rename a complete .part into the cache only when it matches every length and checksum its sources state and
    is a readable checkpoint; otherwise discard it (a server that calls a file complete cannot resume it)."""
    got = os.path.getsize(part)
    sizes = dict(fetched.sizes)
    if entry.size_bytes is not None:
        sizes["the registry"] = entry.size_bytes
    for who, size in sizes.items():
        if got != size:
            _discard(part, part + ".meta")
            raise DownloadError(f"{entry.name}: {url} gave {got} bytes, {who} says {size}; file discarded; {put}")
    sha = sha256_of(part)
    expected = entry.sha256.lower() if entry.sha256 else fetched.sha256
    if expected is not None and sha != expected:
        _discard(part, part + ".meta")
        raise DownloadError(f"{entry.name}: sha256 mismatch for {url} (got {sha}, expected {expected}); file discarded")
    try:
        _verify_checkpoint(part)
    except _Unreadable as exc:
        _discard(part, part + ".meta")
        raise DownloadError(f"{entry.name}: {url} did not give a readable checkpoint ({exc}); file discarded; {put}") from None
    _discard(dest + ".sha256")  # a crash before the new record is written leaves the file to be adopted, never misjudged
    os.replace(part, dest)
    _record_sha256(dest, sha)
    _discard(part + ".meta")


def _part_origin(part: str) -> dict[str, Any] | None:
    try:
        with open(part + ".meta", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _validator(headers) -> str | None:
    """What If-Range can name: a strong ETag, else Last-Modified (a weak ETag cannot be used)."""
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return (headers.get("Last-Modified") or "").strip() or None


def _fetch_into(url: str, part: str, entry: Pretrained, *, show: bool, timeout: float) -> _Fetched:
    """Append the rest of ``url`` to ``part`` (a Range request from its size, valid only If-Range the file is the one
    the .part began with); returns what the server states about the file once it is complete, raises when the
    connection ends early."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    origin = _part_origin(part) if have else None
    if have and (origin is None or origin.get("url") != url or not origin.get("validator")):
        # a .part of unknown origin, of another URL, or from a server that gave no validator: its bytes cannot be
        # shown to belong to the file the server sends now, so it is not extended
        _discard(part, part + ".meta")
        have, origin = 0, None
    began_as = origin.get("validator") if origin else None
    headers = {"User-Agent": "htsat-kernels"}
    if have:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = str(began_as)
    redirects = _RecordRedirects()
    try:
        resp = urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part is not a prefix the server can extend: start over
            _discard(part, part + ".meta")
            return _fetch_into(url, part, entry, show=show, timeout=timeout)
        raise
    with resp:
        hops = [*redirects.hops, resp.headers]
        if (resp.headers.get("Content-Type") or "").strip().lower().startswith(("text/html", "application/xhtml")):
            raise _WebPage(url)
        validator = _validator(resp.headers)
        sizes: dict[str, int] = {}
        linked = next((n for h in hops if (n := _int_header(h.get("X-Linked-Size"))) is not None), None)
        if linked is not None:
            sizes["the hub (X-Linked-Size)"] = linked
        if have and resp.status != 206:
            have = 0  # the server sends the whole file: it ignored the Range, or If-Range found the file changed
        elif have and not (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            _discard(part, part + ".meta")  # a range other than the one asked for: start over on the next attempt
            raise http.client.HTTPException(f"server answered Range bytes={have}- with {resp.headers.get('Content-Range')!r}")
        elif have and validator is not None and validator != began_as:
            _discard(part, part + ".meta")  # a 206 of another version of the file: never spliced
            raise http.client.HTTPException(f"the file changed on the server ({validator} after {began_as})")
        if have:
            whole = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
            if whole.isdigit():
                sizes["its Content-Range"] = int(whole)
        if not have:
            with open(part + ".meta", "w", encoding="utf-8") as f:
                json.dump({"url": url, "validator": validator}, f)
        length = _int_header(resp.headers.get("Content-Length"))
        total = have + length if length is not None else next(iter(sizes.values()), entry.size_bytes)
        bar = None
        if show:
            try:
                from tqdm import tqdm
            except ImportError:  # an optional dependency: no bar without it
                show = False
        if show:
            bar = tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.filename, file=sys.stderr
            )
        try:
            with open(part, "ab" if have else "wb") as f:
                first = not have
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    if first and _looks_like_html(block):  # a page sent as anything, or as nothing
                        raise _WebPage(url)
                    first = False
                    f.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and os.path.getsize(part) < total:
            raise http.client.IncompleteRead(b"", total - os.path.getsize(part))
        return _Fetched(_published_sha256(hops), sizes)


def load_pretrained(model, name: str, *, drop_head: bool = False, progress: bool | None = None):
    """Load registry checkpoint ``name`` into ``model`` (downloading it first); returns the LoadReport."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(model, download(name, progress=progress), drop_head=drop_head)


# -------------------------------------------------------------------------------------------------
# htsat models / htsat download
# -------------------------------------------------------------------------------------------------


def add_parsers(sub) -> None:
    m = sub.add_parser(
        "models",
        help="list the named pretrained checkpoints (htsat download NAME; create_model(NAME, pretrained=True))",
        description=f"Named checkpoints: preset, file, source, training data, reported metric, licence. Cache: {cache_dir()} "
        "($HTSAT_HOME).",
    )
    m.add_argument("--long", action="store_true", help="one block per checkpoint with every field")
    d = sub.add_parser(
        "download",
        help="download named checkpoints into the cache ($HTSAT_HOME) and print their paths",
        description="Download named checkpoints (htsat models lists them) into the cache, checked and resumable; prints "
        "each local path. A cached file is checked against the sha256 recorded at download before it is reported. "
        "HTSAT_OFFLINE=1 only looks in the cache.",
    )
    d.add_argument("names", nargs="+", metavar="NAME")
    d.add_argument(
        "--force",
        action="store_true",
        help="download again even when cached (a damaged file is replaced once the new one checks)",
    )
    d.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on stderr (default: on a terminal)"
    )


def _cached(entry: Pretrained) -> bool:
    return os.path.isfile(os.path.join(cache_dir(), entry.filename))


def format_table() -> str:
    rows = [("name", "preset", "file", "source", "cached", "trained on")]
    for e in REGISTRY.values():
        src = (
            "hub"
            if e.hub_repo
            else ("Google Drive file" if e.url and "google.com" in e.url else "url" if e.url else "manual (Google Drive)")
        )
        rows.append((e.name, e.preset, e.filename, src, "yes" if _cached(e) else "-", e.trained_on))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def format_long() -> str:
    blocks = []
    for e in REGISTRY.values():
        size = f"{e.size_bytes} bytes" if e.size_bytes is not None else "not published"
        blocks.append(
            f"{e.name}\n  preset: {e.preset}\n  file: {e.filename}\n  source: {e.source}\n  trained on: {e.trained_on}\n"
            f"  metric: {e.metric}\n  licence: {e.licence}\n  size: {size}\n  sha256: {e.sha256 or 'not published'}\n"
            f"  cached: {os.path.join(cache_dir(), e.filename) if _cached(e) else 'no'}"
            + (f"\n  note: {e.note}" if e.note else "")
        )
    return "\n\n".join(blocks)


def run(args) -> int:
    if args.command == "models":
        print(format_long() if args.long else format_table())
        return 0
    entries = [get(n) for n in args.names]  # every name checked before any download
    for e in entries:
        print(download(e, progress=args.progress, force=args.force), flush=True)
    return 0

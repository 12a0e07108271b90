from __future__ import annotations

import gc
import json
import threading
import time

import pytest
import torch
from qscope_testing import write_sae_file

from qscope_plugin import load_sae
from qscope_plugin.errors import LayerOutOfRangeError, NotCachedError, QScopeError, SAEFileError
from qscope_plugin.store import SAECache

REPO = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
RELEASE = "qwen-scope-3-1.7b-base-w32k-l50"


def test_loads_through_hf_hub_download_offline(hub_cache):
    tensors = hub_cache.add_sae(REPO, 14, d_model=16, d_sae=64)
    sae = load_sae(RELEASE, 14, cache=None)
    assert sae.cfg.k == 50 and sae.cfg.layer == 14 and sae.cfg.release == RELEASE
    assert (sae.cfg.d_model, sae.cfg.d_sae) == (16, 64)  # widths from the file, not a table
    assert torch.equal(sae.W_dec, tensors["W_dec"])
    assert load_sae(REPO, 14, cache=None).cfg.release == RELEASE  # the repo id works too


def test_pinned_revision(hub_cache):
    hub_cache.add_sae(REPO, 2, d_model=8, d_sae=64, seed=1)
    other = hub_cache.root / "other"
    other.mkdir()
    old = write_sae_file(other / "x.pt", d_model=8, d_sae=64, seed=2)
    hub_cache.add_file(REPO, "layer2.sae.pt", (other / "x.pt").read_bytes(), revision="b" * 40)
    # refs/main now points at b*40; the first snapshot is still reachable by its hash
    assert torch.equal(load_sae(RELEASE, 2, cache=None).W_enc, old["W_enc"])
    assert not torch.equal(load_sae(RELEASE, 2, revision="a" * 40, cache=None).W_enc, old["W_enc"])


def test_offline_and_not_cached_is_one_clear_error(hub_cache):
    with pytest.raises(NotCachedError, match=r"layer5\.sae\.pt .* not in the local cache .* `qscope fetch"):
        load_sae(RELEASE, 5)
    with pytest.raises(NotCachedError, match=f"--layers 5 --revision {'c' * 40}`"):  # the hint keeps the pin
        load_sae(RELEASE, 5, revision="c" * 40)
    with pytest.raises(FileNotFoundError):  # also the built-in class
        load_sae(RELEASE, 5)


def test_layer_out_of_range(hub_cache):
    with pytest.raises(LayerOutOfRangeError, match=r"28 layers: 0\.\.27"):
        load_sae(RELEASE, 28)


def test_k_must_match_release(hub_cache):
    hub_cache.add_sae(REPO, 1, d_model=8, d_sae=64)
    with pytest.raises(QScopeError, match="trained with k=50"):
        load_sae(RELEASE, 1, k=100)


def test_local_folder(tmp_path):
    write_sae_file(tmp_path / "layer0.sae.pt", d_model=8, d_sae=32)
    write_sae_file(tmp_path / "layer3.sae.pt", d_model=8, d_sae=32)
    assert load_sae(tmp_path, 3, k=4, cache=None).cfg.k == 4
    with pytest.raises(QScopeError, match="qscope.json"):
        load_sae(tmp_path, 3, cache=None)
    (tmp_path / "qscope.json").write_text(json.dumps({"k": 6, "release": "mine"}))
    sae = load_sae(tmp_path, 0, cache=None)
    assert (sae.cfg.k, sae.cfg.release) == (6, "mine")
    with pytest.raises(LayerOutOfRangeError, match=r"layers present: \[0, 3\]"):
        load_sae(tmp_path, 1, cache=None)


@pytest.mark.parametrize(("content", "why"), [("{bad json", "Expecting property name"),
                                               ('{"k": "fifty"}', "integer k"), ("[50]", "integer k")])
def test_bad_local_config_is_one_clear_error(tmp_path, content, why):
    write_sae_file(tmp_path / "layer0.sae.pt", d_model=8, d_sae=32)
    (tmp_path / "qscope.json").write_text(content)
    with pytest.raises(QScopeError, match=rf"qscope\.json' is unreadable \(.*{why}.*\); expected JSON such as"):
        load_sae(tmp_path, 0, cache=None)


def test_one_cache_entry_per_sae_however_it_is_named(tmp_path, hub_cache, monkeypatch):
    write_sae_file(tmp_path / "layer0.sae.pt", d_model=8, d_sae=32)
    (tmp_path / "qscope.json").write_text(json.dumps({"k": 4}))
    cache = SAECache()
    first = load_sae(tmp_path, 0, cache=cache)
    monkeypatch.chdir(tmp_path.parent)
    assert load_sae(tmp_path.name, 0, cache=cache) is first  # a relative spelling of the same folder
    assert load_sae(tmp_path, 0, k=4, cache=cache) is first  # k as the folder's qscope.json says
    hub_cache.add_sae(REPO, 3, d_model=8, d_sae=64)
    assert load_sae(RELEASE, 3, cache=cache) is load_sae(REPO, 3, k=50, cache=cache)
    assert len(cache) == 2


def test_lru_never_drops_a_load_in_flight():
    """A slow load must not be evicted by a faster one finishing first (its waiters would load it again)."""
    cache, loads, started = SAECache(max_layers=1), [], threading.Event()

    def slow():
        loads.append("A")
        started.set()
        time.sleep(0.3)
        return "a"

    first = threading.Thread(target=lambda: cache.get(("A",), slow))
    first.start()
    started.wait()
    cache.get(("B",), lambda: loads.append("B") or "b")
    waiter = []
    second = threading.Thread(target=lambda: waiter.append(cache.get(("A",), slow)))
    second.start()
    first.join()
    second.join()
    assert loads == ["A", "B"] and waiter == ["a"]


def test_lru_is_bounded_and_reuses(tmp_path, monkeypatch):
    from qscope_plugin.sae import QwenScopeSAE

    for n in range(4):
        write_sae_file(tmp_path / f"layer{n}.sae.pt", d_model=8, d_sae=32)
    reads, from_file = [], QwenScopeSAE.from_file
    monkeypatch.setattr(QwenScopeSAE, "from_file", lambda *a, **kw: reads.append(kw["layer"]) or from_file(*a, **kw))
    cache = SAECache(max_layers=2)
    first = load_sae(tmp_path, 0, k=4, cache=cache)
    assert load_sae(tmp_path, 0, k=4, cache=cache) is first
    for n in range(1, 4):
        load_sae(tmp_path, n, k=4, cache=cache)
    assert len(cache) == 2 and reads == [0, 1, 2, 3]
    del first
    gc.collect()
    load_sae(tmp_path, 0, k=4, cache=cache)  # evicted and no longer used anywhere: read again
    assert reads == [0, 1, 2, 3, 0] and len(cache) == 2


def test_all_layer_harvest_does_not_thrash_the_lru(tmp_path, monkeypatch):
    """More layers in use than the LRU holds: asking again returns the SAEs in use, without re-reading a file."""
    from qscope_plugin.sae import QwenScopeSAE

    for n in range(6):
        write_sae_file(tmp_path / f"layer{n}.sae.pt", d_model=8, d_sae=32)
    cache = SAECache(max_layers=2)
    saes = {n: load_sae(tmp_path, n, k=4, cache=cache) for n in range(6)}
    norms = saes[0].decoder_norms()
    reads = []
    monkeypatch.setattr(QwenScopeSAE, "from_file", lambda *a, **kw: reads.append(a) or pytest.fail("re-read"))
    for _ in range(2):  # e.g. a second pass of a harvest over every layer
        assert all(load_sae(tmp_path, n, k=4, cache=cache) is saes[n] for n in range(6))
    assert reads == [] and len(cache) == 2 and saes[0].decoder_norms() is norms


def test_lru_bounded_by_bytes(tmp_path):
    for n in range(3):
        write_sae_file(tmp_path / f"layer{n}.sae.pt", d_model=8, d_sae=32)
    one = 4 * (2 * 8 * 32 + 32 + 8)
    cache = SAECache(max_layers=10, max_bytes=2 * one)
    for n in range(3):
        load_sae(tmp_path, n, k=4, cache=cache)
    assert len(cache) == 2


def test_concurrent_requests_share_one_load():
    cache, calls = SAECache(), []

    def slow_load():
        calls.append(1)
        time.sleep(0.2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(("a",), slow_load))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_failed_load_is_not_cached():
    cache = SAECache()

    def boom():
        raise SAEFileError("bad")

    with pytest.raises(SAEFileError):
        cache.get(("x",), boom)
    assert len(cache) == 0
    assert cache.get(("x",), lambda: "ok") == "ok"


def test_bad_hub_file_is_removed_from_the_cache(hub_cache):
    path = hub_cache.add_file(REPO, "layer7.sae.pt", b"not a zip file at all")
    blob = path.resolve()
    with pytest.raises(SAEFileError, match="removed from the cache"):
        load_sae(RELEASE, 7)
    assert not path.exists() and not blob.exists()
    with pytest.raises(NotCachedError):  # next time it would be downloaded again, not re-read
        load_sae(RELEASE, 7)


def _hub_exceptions():
    """Real exception classes of huggingface_hub and its HTTP clients, built as the hub client builds them."""
    import httpx
    import httpx2
    import requests
    from huggingface_hub import errors as hf

    url = f"https://huggingface.co/{REPO}/resolve/main/layer3.sae.pt"

    def response(status):
        return httpx2.Response(status, request=httpx2.Request("GET", url))

    return {
        "revision": (hf.RevisionNotFoundError("Invalid rev id: nope\nmore", response=response(404)),
                     r"revision 'nope' does not exist in Qwen/SAE-Res.*expected a branch, tag or full commit"),
        "repo": (hf.RepositoryNotFoundError("Repository Not Found", response=response(401)),
                 r"no repository 'Qwen/SAE-Res-Qwen3-1\.7B-Base-W32K-L0_50'.*`qscope releases`"),
        "gated": (hf.GatedRepoError("Access restricted", response=response(403)), r"is gated.*hf auth login"),
        "entry": (hf.RemoteEntryNotFoundError("Entry Not Found", response=response(404)),
                  r"has no layer3\.sae\.pt at revision nope.*layers 0\.\.27"),
        "http": (hf.HfHubHTTPError("Server Error\nrequest id: x", response=response(503)),
                 r"HTTP 503 .*Server Error\).*later"),
        "httpx2": (httpx2.ConnectError("[Errno 111] Connection refused"), r"cannot be reached \(ConnectError.*proxy"),
        "httpx": (httpx.ReadTimeout("timed out"), r"cannot be reached \(ReadTimeout"),
        "requests": (requests.exceptions.ConnectionError("Max retries exceeded"), r"cannot be reached"),
        "disk": (OSError(28, "No space left on device"), r"downloading .* failed .*free disk space"),
    }


@pytest.mark.parametrize("case", ["revision", "repo", "gated", "entry", "http", "httpx2", "httpx", "requests", "disk"])
def test_hub_errors_are_one_clear_error_and_leave_nothing(hub_cache, monkeypatch, case):
    import huggingface_hub

    from qscope_plugin.errors import HubError
    from qscope_plugin.store import DEFAULT_CACHE

    exc, message = _hub_exceptions()[case]
    blobs = hub_cache.repo(REPO) / "blobs"

    def failing_download(repo_id, filename, **kwargs):
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / "abc123.0f0f0f0f.incomplete").write_bytes(b"half a file")  # as a transfer cut short leaves it
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(HubError, match=message) as info:
        load_sae(RELEASE, 3, revision="nope")
    assert isinstance(info.value, QScopeError) and "\n" not in str(info.value)
    assert not list(blobs.glob("*.incomplete")) and len(DEFAULT_CACHE) == 0


def test_partial_download_being_written_by_another_process_is_kept(hub_cache, monkeypatch):
    import httpx2
    import huggingface_hub
    from filelock import FileLock

    from qscope_plugin.errors import HubUnreachableError

    folder = hub_cache.repo(REPO).name
    blobs = hub_cache.repo(REPO) / "blobs"
    mine, theirs = blobs / "aaa.1.incomplete", blobs / "bbb.2.incomplete"

    def failing_download(repo_id, filename, **kwargs):
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_bytes(b"x")
        theirs.write_bytes(b"y")
        raise httpx2.ReadError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    lock_path = hub_cache.root / ".locks" / folder / "bbb.lock"
    lock_path.parent.mkdir(parents=True)
    other = FileLock(lock_path)
    with other:  # another download holds the lock of its etag
        with pytest.raises(HubUnreachableError):
            load_sae(RELEASE, 3)
        assert theirs.exists() and not mine.exists()


def test_unrelated_errors_are_not_disguised(hub_cache, monkeypatch):
    import huggingface_hub

    def buggy(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", buggy)
    with pytest.raises(KeyError):
        load_sae(RELEASE, 3)


def test_sae_failing_validate_is_evicted_from_the_lru(hub_cache):
    from qscope_testing import make_sae_tensors

    from qscope_plugin.store import DEFAULT_CACHE

    tensors = make_sae_tensors(d_model=8, d_sae=64)
    tensors["W_enc"][3, 1] = float("nan")
    staging = hub_cache.root / "s.pt"
    torch.save(tensors, staging)
    hub_cache.add_file(REPO, "layer6.sae.pt", staging.read_bytes())
    hub_cache.add_sae(REPO, 7, d_model=8, d_sae=64)
    bad, good = load_sae(RELEASE, 6), load_sae(RELEASE, 7)  # loading stays cheap: no full read
    assert load_sae(RELEASE, 6) is bad and len(DEFAULT_CACHE) == 2
    with pytest.raises(SAEFileError, match="non-finite"):
        bad.validate()
    assert len(DEFAULT_CACHE) == 1 and load_sae(RELEASE, 7) is good.validate()
    with pytest.raises(NotCachedError):  # the bad file left the hub cache too: the next load downloads it again
        load_sae(RELEASE, 6)
    hub_cache.add_file(REPO, "layer6.sae.pt", staging.read_bytes())
    assert load_sae(RELEASE, 6) is not bad  # read again from the file, not the bad cached copy
    cache = SAECache()
    mine = load_sae(RELEASE, 6, cache=cache)
    with pytest.raises(SAEFileError):
        mine.validate()
    assert len(cache) == 0


def test_every_plugin_error_is_importable_from_the_top_level():
    """Users catch ``qs.NotCachedError`` etc. without knowing which module raises it."""
    import inspect

    import qscope_plugin
    from qscope_plugin import errors, sae

    raised = {name: obj for module in (errors, sae) for name, obj in inspect.getmembers(module, inspect.isclass)
              if issubclass(obj, QScopeError) and obj.__module__ == module.__name__}
    assert "NotCachedError" in raised and set(raised) <= set(qscope_plugin.__all__)
    assert all(getattr(qscope_plugin, name) is obj for name, obj in raised.items())


def _flip_float_byte(path) -> None:
    """Flip one byte inside a weight matrix's float data: the file still loads as a finite, valid SAE."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:  # torch.save's zip: each tensor is one stored (uncompressed) entry
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's own
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[offset - offset % 4] ^= 0x01  # lowest mantissa bit of a float32: a finite, slightly wrong weight
    path.write_bytes(bytes(data))


def test_verify_reports_exactly_the_corrupted_layer(hub_cache):
    from qscope_plugin.store import verify

    for n in (2, 3, 4):
        hub_cache.add_sae(REPO, n, d_model=8, d_sae=64, seed=n)
    snapshot = hub_cache.snapshot(REPO)
    blob = (snapshot / "layer3.sae.pt").resolve()
    before = load_sae(RELEASE, 3, cache=None)
    before = (before.W_enc.clone(), before.W_dec.clone())
    _flip_float_byte(blob)
    flipped = load_sae(RELEASE, 3, cache=None)
    changed = [not torch.equal(a, b) for a, b in zip((flipped.W_enc, flipped.W_dec), before, strict=True)]
    assert sum(changed) == 1 and flipped.validate()  # one weight differs; no structural check can see it
    checks = verify(RELEASE, [1, 2, 3, 4])
    assert [(c.layer, c.status) for c in checks] == [(1, "missing"), (2, "ok"), (3, "corrupted"), (4, "ok")]
    assert checks[2].expected == blob.name and checks[2].actual != blob.name and checks[1].actual == checks[1].expected
    assert blob.exists()  # verify only reports


def test_load_sae_verify_refuses_a_corrupted_file_and_drops_it(hub_cache):
    from qscope_plugin.errors import ChecksumMismatchError
    from qscope_plugin.store import DEFAULT_CACHE

    hub_cache.add_sae(REPO, 5, d_model=8, d_sae=64)
    path = hub_cache.snapshot(REPO) / "layer5.sae.pt"
    blob = path.resolve()
    assert load_sae(RELEASE, 5, verify=True).cfg.layer == 5  # an intact file loads
    _flip_float_byte(blob)
    cached = load_sae(RELEASE, 5)  # without verify: the LRU entry, loaded before the flip
    with pytest.raises(ChecksumMismatchError, match=rf"layer 5 .* is corrupted: its SHA-256 is [0-9a-f]{{64}}, the "
                       rf"hub recorded {blob.name}\. It was removed .*`qscope fetch {RELEASE} --layers 5 "
                       r"--force-download`"):
        load_sae(RELEASE, 5, verify=True)
    assert not path.exists() and not blob.exists() and len(DEFAULT_CACHE) == 0 and cached is not None
    with pytest.raises(NotCachedError):
        load_sae(RELEASE, 5)


def test_checksums_of_a_local_folder(tmp_path):
    import subprocess

    from qscope_plugin.errors import ChecksumMismatchError
    from qscope_plugin.store import verify, write_checksums

    for n in (0, 1):
        write_sae_file(tmp_path / f"layer{n}.sae.pt", d_model=8, d_sae=32, seed=n)
    with pytest.raises(QScopeError, match="has no SHA256SUMS .*`qscope checksum"):
        verify(tmp_path)
    sums = write_checksums(tmp_path)
    assert subprocess.run(["sha256sum", "-c", sums.name], cwd=tmp_path, capture_output=True).returncode == 0
    write_sae_file(tmp_path / "layer2.sae.pt", d_model=8, d_sae=32)  # added after the checksums
    assert load_sae(tmp_path, 1, k=4, cache=None, verify=True).cfg.layer == 1
    _flip_float_byte(tmp_path / "layer1.sae.pt")
    assert [(c.layer, c.status) for c in verify(tmp_path)] == [(0, "ok"), (1, "corrupted"), (2, "unverifiable")]
    with pytest.raises(ChecksumMismatchError, match=r"layer 1 .* is corrupted: .* SHA256SUMS records"):
        load_sae(tmp_path, 1, k=4, cache=None, verify=True)
    assert (tmp_path / "layer1.sae.pt").exists()  # a user's own file is reported, never deleted
    with pytest.raises(QScopeError, match="records no SHA-256 for layer2.sae.pt"):
        load_sae(tmp_path, 2, k=4, cache=None, verify=True)
    sums.write_text("not a checksum line\n")
    with pytest.raises(QScopeError, match=r"line 1 is 'not a checksum line'; expected 'HASH  layerN\.sae\.pt'"):
        verify(tmp_path)


def test_layer_count_of_a_folder_a_release_and_the_demo(tmp_path):
    from qscope_plugin.catalogue import release
    from qscope_plugin.errors import UnknownReleaseError
    from qscope_plugin.store import DEMO_RELEASE, DEMO_SAE_DIR, layer_count, local_layers

    for n in (0, 4):  # a gap: the count runs to the highest layer
        write_sae_file(tmp_path / f"layer{n}.sae.pt", d_model=8, d_sae=16)
    assert layer_count(tmp_path) == layer_count(str(tmp_path)) == 5
    assert layer_count(DEMO_RELEASE) == len(local_layers(DEMO_SAE_DIR)) == 4
    assert layer_count("qwen-scope-3-1.7b-base-w32k-l50") == release("qwen-scope-3-1.7b-base-w32k-l50").n_layers == 28
    with pytest.raises(UnknownReleaseError):
        layer_count("no-such-release")

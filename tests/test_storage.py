"""pipeline.storage against local disk and a real S3 server (SeaweedFS, tests/s3_server.py): the same tests on both."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.storage import OutputFile, Storage, StorageError, check_uri, filesystem, open_uri

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    srv = request.getfixturevalue("s3_server")
    return Storage(srv.uri(request.getfixturevalue("s3_prefix")), srv.options())


def files(store: Storage, rel: str = "") -> list[str]:
    return [e.path for e in store.list(rel, recursive=True)]


# ---- reading and writing ------------------------------------------------------------------------------------
def test_write_read_round_trip(store):
    data = os.urandom(100_000)
    store.write_bytes("a/b/c.bin", data)
    store.write_bytes("empty", b"")
    assert store.read_bytes("a/b/c.bin") == data
    assert store.read_bytes("empty") == b""
    with store.open_input("a/b/c.bin") as f:
        f.seek(99_990)
        assert f.read() == data[99_990:]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing")
    with pytest.raises(FileNotFoundError):
        store.open_input("a/missing")
    with pytest.raises(FileNotFoundError):
        open_uri(store.uri("missing"), store.options)


def test_atomic_overwrite(store):
    """Readers see one version or the other, whole, while it is overwritten again and again."""
    versions = [bytes([65 + i]) * (2 * MB + i) for i in range(2)]
    store.write_bytes("v", versions[0])
    if not store.local:  # A -> B -> A gives the same ETag: reads are checked against the MD5 the ETag carries
        from pipeline.storage import _etag_matches

        etag = store._etag(store.path("v"))
        assert _etag_matches(etag, versions[0]) is True and _etag_matches(etag, versions[1]) is False
    reads, bad, stop = [0], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                b = store.read_bytes("v")
            except Exception as exc:  # noqa: BLE001 - reported below
                bad.append(repr(exc)[:200])
                continue
            reads[0] += 1
            if b not in versions:  # e.g. 256 KiB chunks of both versions (pyarrow input streams on S3)
                bad.append(f"torn: {len(b)} bytes, {b.count(b'A')} A + {b.count(b'B')} B")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(12):
            store.write_bytes("v", versions[i % 2], durable=False)
    finally:
        stop.set()
        t.join()
    assert not bad and reads[0] > 0, f"{len(bad)} bad reads of {reads[0] + len(bad)}: {bad[:5]}"
    assert store.read_bytes("v") == versions[1]
    assert files(store) == ["v"]  # no temp files left behind


def test_list(store):
    for rel, n in [("a.txt", 1), ("d/b.txt", 2), ("d/e/c.txt", 3), ("d/a.txt", 4), ("dd/x.txt", 5)]:
        store.write_bytes(rel, b"x" * n)
    assert [e.path for e in store.list()] == ["a.txt"]  # files only, not directories
    top = store.list(recursive=True)
    assert [(e.path, e.size) for e in top] == [
        ("a.txt", 1),
        ("d/a.txt", 4),
        ("d/b.txt", 2),
        ("d/e/c.txt", 3),
        ("dd/x.txt", 5),
    ]
    assert all(e.mtime and abs(e.mtime - time.time()) < 600 for e in top)
    assert [e.path for e in store.list("d")] == ["d/a.txt", "d/b.txt"]  # relative to the root, not to "d"
    assert [e.path for e in store.list("d/", recursive=True)] == ["d/a.txt", "d/b.txt", "d/e/c.txt"]
    assert [e.path for e in store.walk_files("d/e")] == ["d/e/c.txt"]
    assert store.list("absent") == [] and store.list("absent", recursive=True) == []
    assert store.list("a.txt") == []  # a file is not a directory
    assert [e.path for e in store.child("d").list()] == ["a.txt", "b.txt"]


def test_exists_size_is_dir(store):
    assert not store.exists("") and not store.is_dir("")  # nothing written yet
    store.write_bytes("d/f.bin", b"12345")
    assert store.exists("d/f.bin") and store.size("d/f.bin") == 5 and not store.is_dir("d/f.bin")
    assert store.exists("d") and store.is_dir("d") and store.is_dir("")
    assert not store.exists("missing") and store.size("missing") is None and not store.is_dir("missing")
    assert not store.exists("d/f.bi")  # no prefix matching
    store.delete("d/f.bin")
    assert not store.exists("d/f.bin")


@pytest.mark.parametrize("size", [1000, 12 * MB], ids=["small", "multipart"])
def test_open_output_visible_only_after_close(store, size):
    data = os.urandom(size)
    f = store.open_output("out/o.bin")
    assert isinstance(f, OutputFile)
    for i in range(0, size, 4 * MB):
        f.write(data[i : i + 4 * MB])
    f.flush()
    time.sleep(0.3)  # on S3, parts of a multipart upload are being sent in the background
    assert f.tell() == size
    assert not store.exists("out/o.bin") and store.size("out/o.bin") is None
    assert "out/o.bin" not in files(store)
    f.close()
    f.close()  # idempotent
    assert store.size("out/o.bin") == size and store.read_bytes("out/o.bin") == data
    assert files(store) == ["out/o.bin"]


def test_failed_write_publishes_nothing(store):
    old = b"old content"
    store.write_bytes("kept", old)
    for rel in ("new", "kept"):
        with pytest.raises(RuntimeError):
            with store.open_output(rel) as f:
                f.write(b"partial " * 1000)
                raise RuntimeError("writer died")
    assert not store.exists("new")
    assert store.size("kept") in (None, len(old))  # local: the old file; S3: gone (pyarrow cannot abort)
    if store.local:
        assert store.read_bytes("kept") == old
    f = store.open_output("discarded")
    f.write(b"x" * 100)
    f.discard()
    g = store.open_output("dropped")
    g.write(b"y" * 100)
    del g
    gc.collect()
    assert not store.exists("discarded") and not store.exists("dropped")
    assert files(store) in (["kept"], [])


def test_move(store):
    data = os.urandom(300_000)
    store.write_bytes("src/a.bin", data)
    store.write_bytes("dst/b.bin", b"to be replaced")
    store.move("src/a.bin", "dst/b.bin")
    assert store.read_bytes("dst/b.bin") == data and not store.exists("src/a.bin")
    store.move("dst/b.bin", "other/deeper/c.bin")  # parents are created
    assert store.read_bytes("other/deeper/c.bin") == data
    store.move("other/deeper/c.bin", "other/deeper/c.bin")  # onto itself: a no-op, not a delete
    assert store.read_bytes("other/deeper/c.bin") == data
    assert files(store) == ["other/deeper/c.bin"]
    with pytest.raises(FileNotFoundError):
        store.move("missing", "x")
    with pytest.raises(FileNotFoundError):
        store.move("missing", "missing")
    assert not store.exists("x")


def test_copy(store):
    store.write_bytes("a", b"abc")
    store.copy("a", "sub/b")
    store.copy("a", "a")
    assert store.read_bytes("a") == store.read_bytes("sub/b") == b"abc"
    store.write_bytes("a", b"changed")
    assert store.read_bytes("sub/b") == b"abc"  # a copy, not a link
    with pytest.raises(FileNotFoundError):
        store.copy("missing", "c")


def test_delete(store):
    store.write_bytes("d/x", b"1")
    store.delete("d/x")
    assert not store.exists("d/x")
    store.delete("d/x")  # missing is fine
    store.delete("never/was")
    with pytest.raises(FileNotFoundError):
        store.delete("d/x", missing_ok=False)


def test_delete_dir(store):
    for rel in ("d/a", "d/e/b", "d/e/f/c", "dd/keep", "keep"):
        store.write_bytes(rel, b"1")
    store.delete_dir("d")
    assert files(store) == ["dd/keep", "keep"]
    assert not store.exists("d/a") and not store.exists("d/e/b")
    if store.local:  # SeaweedFS keeps the emptied sub-folders d/e, d/e/f as common prefixes: `d` still "is a dir"
        assert not store.exists("d")
    store.delete_dir("d")  # missing is fine
    store.delete_dir("never/was")
    store.child("dd").delete_dir("")
    assert files(store) == ["keep"]


def test_child(store):
    c = store.child("sub/dir/")
    assert c.uri() == store.uri("sub/dir") and c.uri("f") == store.uri("sub/dir/f")
    c.write_bytes("f", b"hi")
    assert store.read_bytes("sub/dir/f") == b"hi"
    assert [e.path for e in c.list()] == ["f"]
    assert c.child("x").root == store.uri("sub/dir/x")


def test_pickled_storage_works(store):
    copy = pickle.loads(pickle.dumps(store))
    assert copy.root == store.root and copy.options == store.options and repr(copy) == repr(store)
    copy.write_bytes("p/x", b"from the copy")
    assert store.read_bytes("p/x") == b"from the copy"


def test_pickled_storage_in_a_fresh_process(store):
    """What a Ray worker gets: the options travel in the pickle, no AWS_* variables needed."""
    store.write_bytes("in", b"ping")
    code = "import pickle, sys; s = pickle.load(sys.stdin.buffer); s.write_bytes('out', s.read_bytes('in') + b'!')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(store), env=env, cwd=REPO, check=True, timeout=60)
    assert store.read_bytes("out") == b"ping!"


def test_parquet_round_trip(store):
    t = pa.table({"id": [f"s{i}" for i in range(1000)], "tokens": [list(range(i % 7)) for i in range(1000)]})
    with store.open_output("shards/part-0.parquet") as f:
        with pq.ParquetWriter(f, t.schema, compression="zstd") as w:
            w.write_table(t.slice(0, 600), row_group_size=600)
            w.write_table(t.slice(600), row_group_size=400)
    with store.open_input("shards/part-0.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.num_row_groups == 2 and pf.metadata.num_rows == 1000
        assert pf.read_row_group(1).column("id")[0].as_py() == "s600"
        assert pf.read().equals(t)
    # a writer that dies mid-shard leaves no (short but valid) shard behind
    with pytest.raises(ValueError):
        with store.open_output("shards/part-1.parquet") as f, pq.ParquetWriter(f, t.schema) as w:
            w.write_table(t.slice(0, 10))
            raise ValueError("died")
    assert files(store) == ["shards/part-0.parquet"]
    # pyarrow.dataset reads through the same filesystem
    import pyarrow.dataset as ds

    assert ds.dataset(store.path("shards"), filesystem=store.fs, format="parquet").count_rows() == 1000


# ---- S3 only ------------------------------------------------------------------------------------------------
def write_shards(store: Storage, n: int = 2, rows: int = 50) -> pa.Table:
    parts = []
    for k in range(n):
        t = pa.table({"id": [f"{k}-{i}" for i in range(rows)], "n": list(range(rows))})
        with store.open_output(f"shards/part-{k}.parquet") as f:
            pq.write_table(t, f)
        parts.append(t)
    return pa.concat_tables(parts)


def test_hf_datasets_loads_shards_from_s3(s3_server, s3_prefix, tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("s3fs")
    store = Storage(s3_server.uri(s3_prefix), s3_server.options())
    t = write_shards(store)
    ds = datasets.load_dataset(
        "parquet",
        data_files=s3_server.uri(f"{s3_prefix}/shards/*.parquet"),
        storage_options=s3_server.storage_options(),
        cache_dir=str(tmp_path / "hf"),
        split="train",
    )
    assert ds.num_rows == t.num_rows and sorted(ds["id"]) == sorted(t.column("id").to_pylist())


def test_endpoint_and_credentials_from_environment_alone(s3_server, s3_prefix, monkeypatch):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    store = Storage(s3_server.uri(s3_prefix))  # no options
    assert store.options.endpoint_url is None and store.options.access_key is None
    store.write_bytes("env/x", b"via AWS_ENDPOINT_URL")
    assert Storage(s3_server.uri(s3_prefix), s3_server.options()).read_bytes("env/x") == b"via AWS_ENDPOINT_URL"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url.replace("http://", ""))  # no scheme: https
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)  # the S3-specific one wins
    assert Storage(s3_server.uri(s3_prefix)).read_bytes("env/x") == b"via AWS_ENDPOINT_URL"


def test_bucket_root(s3_server):
    """A Storage at a bucket's root: listing and delete_dir('') empty it but keep the bucket."""
    fs = s3_server.fs(allow_bucket_creation=True)
    fs.create_dir("rootwipe")
    store = Storage("s3://rootwipe/", s3_server.options())
    store.write_bytes("a", b"1")
    store.write_bytes("b/c", b"2")
    assert files(store) == ["a", "b/c"]
    store.delete_dir("")
    assert files(store) == [] and fs.get_file_info("rootwipe").type == pafs.FileType.Directory


def test_missing_bucket_and_bad_credentials(s3_server):
    with pytest.raises(StorageError, match="no bucket"):
        Storage("s3:///x", s3_server.options())
    store = Storage("s3://no-such-bucket/x", s3_server.options())
    assert not store.exists("a") and store.list() == []
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):  # the server does not create buckets on upload
        store.write_bytes("a", b"1")
    wrong = s3_server.options().model_copy(update={"secret_key": "wrong"})
    with pytest.raises(OSError, match="ACCESS_DENIED|SignatureDoesNotMatch|403"):
        Storage(s3_server.uri("x"), wrong).exists("a")


# ---- locations ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["ftp://host/x", "azure://container/x", "abfs://c/x", "sftp://h/x"])
def test_unsupported_scheme_fails_before_any_io(uri, monkeypatch):
    def no_io(*a, **k):
        raise AssertionError("a filesystem was built for an unsupported location")

    for name in ("LocalFileSystem", "S3FileSystem", "GcsFileSystem", "PyFileSystem"):
        monkeypatch.setattr(pafs, name, no_io)
    for call in (
        lambda: Storage(uri),
        lambda: filesystem(uri),
        lambda: open_uri(uri),
        lambda: check_uri(uri, writable=True),
    ):
        with pytest.raises(StorageError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and repr(uri) in msg and "unsupported" in msg and "s3://" in msg


@pytest.mark.parametrize("uri", ["hf://datasets/org/name", "https://example.com/data", "http://127.0.0.1:9/x"])
def test_read_only_locations(uri):
    store = Storage(uri)  # builds a filesystem but does no I/O
    for write in (
        lambda: store.write_bytes("a", b"1"),
        lambda: store.open_output("a"),
        lambda: store.move("a", "b"),
        lambda: store.copy("a", "b"),
        lambda: store.delete("a"),
        lambda: store.delete_dir("a"),
        lambda: store.makedirs("a"),
        lambda: store.child("c").write_bytes("a", b""),
    ):
        with pytest.raises(StorageError, match="read-only"):
            write()
    with pytest.raises(StorageError, match="unsupported output"):
        check_uri(uri, writable=True)
    assert check_uri(uri) in ("hf", "http", "https")


def test_local_paths_and_file_uris(tmp_path):
    a = Storage(str(tmp_path / "x"))
    b = Storage(f"file://{tmp_path}/x")
    c = Storage(str(tmp_path / "x") + "/")
    assert a.base == b.base == c.base == str(tmp_path / "x") and a.local and b.local
    a.write_bytes("f", b"1")
    assert b.read_bytes("f") == b"1" and os.path.isfile(tmp_path / "x" / "f")


def test_an_extra_backend_is_one_module(tmp_path):
    """`pipeline/storage_backends/<scheme>.py` is found by its scheme: memory:// reads through it as a source
    location, and is refused as an output (its module says it is not writable)."""
    import fsspec

    from pipeline.storage import StorageError, check_uri

    fs = fsspec.filesystem("memory")
    fs.pipe("/bkt/in/a.txt", b"hello")
    st = Storage("memory://bkt/in")
    assert st.read_bytes("a.txt") == b"hello" and [e.path for e in st.list()] == ["a.txt"]
    assert check_uri("memory://bkt/in") == "memory"
    with pytest.raises(StorageError, match="unsupported output"):
        check_uri("memory://bkt/out", writable=True)
    with pytest.raises(StorageError, match="read-only"):
        st.write_bytes("b.txt", b"x")

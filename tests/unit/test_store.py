"""The object-store seam: the fake and the fsspec store behave alike, and a store
that cannot be reached is an error, never "no checkpoint"."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from podpipe.errors import StoreError
from podpipe.model.output import Output
from podpipe.runtime.storage import durable
from podpipe.runtime.storage.store import FsspecStore, MemoryStore


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    return FsspecStore((tmp_path / "store").as_uri())


def test_what_is_written_is_read_listed_and_deleted(store, tmp_path):
    assert store.read("a/b.json") is None
    assert store.list("a") == []
    store.write("a/b.json", b"{}")
    local = tmp_path / "x.bin"
    local.write_bytes(b"payload")
    store.child("a").upload("c/d.bin", local)
    assert store.read("a/b.json") == b"{}"
    assert store.list("a") == ["a/b.json", "a/c/d.bin"]
    assert store.child("a").list("") == ["b.json", "c/d.bin"]
    assert store.download("a/c/d.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"payload"
    assert not store.download("a/none.bin", tmp_path / "none.bin")
    store.delete("a/b.json")
    assert store.list("a") == ["a/c/d.bin"]


def test_a_store_that_cannot_be_reached_is_an_error_not_an_empty_store(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's directory should be")
    with pytest.raises(StoreError, match=str(blocked)):
        FsspecStore(blocked.as_uri()).child("pipeline").write("x", b"1")
    down = MemoryStore()
    down.down = True
    with pytest.raises(StoreError, match="memory://test"):
        durable.latest(down, "shard-00000")


def test_an_unknown_store_protocol_is_an_error_naming_the_url():
    with pytest.raises(StoreError, match="bogus://x"):
        FsspecStore("bogus://x")


def _copy(tmp_path: Path, node: str, key: int, data: bytes) -> Output:
    from podpipe.runtime.data import arrowfile
    import pyarrow as pa

    path = tmp_path / f"{node}-{key}.arrow"
    nbytes, checksum = arrowfile.write_table(pa.table({"x": list(data)}), path)
    return Output(node, key, str(path), nbytes, len(data), checksum, "node")


def test_a_checkpoint_is_found_only_once_its_manifest_is_written(tmp_path):
    store = MemoryStore()
    tier = durable.DurableTier(store, every_batches=1, interval=30, keep=2, source_batches=2,
                               shards=1, group_of=lambda node, key: "shard-00000")
    copy = _copy(tmp_path, "a", 0, b"\x01\x02")
    tier.take([copy], {"a": [0]}, {"shard-00000": False})
    assert tier.close(wait=10)
    found = durable.latest(store, "shard-00000")
    assert found is not None and found.finished == {"a": {0}} and not found.complete
    fetched, notes = durable.fetch(found, tmp_path / "run")
    assert notes == [] and [(c.node, c.key, c.tier) for c in fetched] == [("a", 0, "durable")]
    assert Path(fetched[0].path).read_bytes() == Path(copy.path).read_bytes()
    manifest = msgspec.json.decode(store.read("shard-00000/manifest-000001.json"))
    assert manifest["schemaVersion"] == durable.SCHEMA_VERSION
    # Without its manifest, uploaded outputs are no checkpoint.
    store.delete("shard-00000/manifest-000001.json")
    assert durable.latest(store, "shard-00000") is None


def test_a_corrupt_durable_copy_is_not_used(tmp_path):
    store = MemoryStore()
    tier = durable.DurableTier(store, every_batches=1, interval=30, keep=2, source_batches=1,
                               shards=1, group_of=lambda node, key: "shard-00000")
    tier.take([_copy(tmp_path, "a", 0, b"\x01")], {"a": [0]}, {"shard-00000": True})
    assert tier.close(wait=10)
    (key,) = [k for k in store.objects if k.endswith(".arrow")]
    store.objects[key] = store.objects[key][:-8] + b"garbage!"
    fetched, notes = durable.fetch(durable.latest(store, "shard-00000"), tmp_path / "run")
    assert fetched == [] and "corrupt" in notes[0]


@pytest.mark.parametrize("how", ["write", "upload"])
def test_a_local_store_never_shows_an_object_half_written(how, tmp_path, monkeypatch):
    store = FsspecStore((tmp_path / "store").as_uri())
    final = tmp_path / "store" / "a" / "manifest-1.json"
    written_to: list[str] = []  # where the bytes go while they go out
    fs = store._fs
    for name, target in (("pipe_file", 0), ("put_file", 1)):
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda *args, real=real, target=target: (
            written_to.append(Path(args[target]).name), real(*args))[1])
    local = tmp_path / "m.json"
    local.write_bytes(b'{"whole": true}')
    if how == "write":
        store.write("a/manifest-1.json", local.read_bytes())
    else:
        store.upload("a/manifest-1.json", local)
    assert len(written_to) == 1 and written_to[0].startswith(".manifest-1.json.")
    assert final.read_bytes() == b'{"whole": true}'
    assert store.list("a") == ["a/manifest-1.json"]  # no temporary name left

"""The object store: one narrow interface to the durable tier (fsspec inside).

Durable checkpoints and reuse across runs go through a `Store` rooted at a URL
(`file:///…`, `s3://bucket/prefix`, …); keys are `/`-separated paths under it.
Failures are translated here: a key that is not there is `None` or an empty
listing, and anything else (no connection, no permission, no such bucket, a
malformed URL) is a `StoreError` naming the URL and the cause, so that "the store
is down" is never mistaken for "no checkpoint". `MemoryStore` is the in-package
fake the unit tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from podpipe.errors import StoreError
from podpipe.runtime.plumbing import files


class Store(Protocol):
    url: str

    def read(self, key: str) -> bytes | None:
        """The object's bytes, None if there is none."""

    def write(self, key: str, data: bytes) -> None:
        """Write an object in one PUT (an object appears whole or not at all)."""

    def upload(self, key: str, local: Path) -> None: ...

    def download(self, key: str, local: Path) -> bool:
        """Copy the object to `local`; False if there is none."""

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix` (recursively), sorted; [] if there are none."""

    def delete(self, key: str) -> None: ...

    def child(self, prefix: str) -> "Store":
        """The store rooted at `prefix` under this one."""


class FsspecStore:
    def __init__(self, url: str) -> None:
        import fsspec  # here, not at import: stage processes mostly never need it

        self.url = url.rstrip("/")
        try:
            self._fs, root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError, OSError) as exc:
            raise StoreError(self.url, exc) from exc
        self._root = root.rstrip("/")
        self._folders: set[str] = set()
        protocols = self._fs.protocol
        self._local = "file" in (protocols if isinstance(protocols, tuple) else (protocols,))

    def child(self, prefix: str) -> "FsspecStore":
        return FsspecStore(f"{self.url}/{prefix.strip('/')}")

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root

    def _call(self, what: Any, *args: Any, reading: bool = False) -> Any:
        """Call the backend; FileNotFoundError passes through when `reading` (nothing
        there), every other failure is a StoreError."""
        try:
            return what(*args)
        except FileNotFoundError as exc:
            if reading:
                raise
            raise StoreError(self.url, exc) from exc
        except Exception as exc:  # noqa: BLE001 - every backend fails its own way
            raise StoreError(self.url, exc) from exc

    def _parent(self, key: str) -> None:
        folder = self._path(key).rsplit("/", 1)[0]
        if folder not in self._folders:  # a directory store needs them
            self._call(self._fs.makedirs, folder, True)
            self._folders.add(folder)

    def read(self, key: str) -> bytes | None:
        try:
            data: bytes | None = self._call(self._fs.cat_file, self._path(key), reading=True)
            return data
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        self._put(key, lambda path: self._fs.pipe_file(path, data))

    def upload(self, key: str, local: Path) -> None:
        self._put(key, lambda path: self._fs.put_file(str(local), path))

    def _put(self, key: str, put: Callable[[str], None]) -> None:
        """An object appears whole or not at all: a PUT is; a file written on a
        local filesystem is not (another pod listing the store would read it half
        written), so there it is written under a temporary name and renamed."""
        self._parent(key)
        if not self._local:
            self._call(put, self._path(key))
            return
        folder, _, name = self._path(key).rpartition("/")
        tmp = f"{folder}/{files.temporary_name(name)}"
        self._call(put, tmp)
        self._call(self._fs.mv, tmp, self._path(key))

    def download(self, key: str, local: Path) -> bool:
        try:
            self._call(self._fs.get_file, self._path(key), str(local), reading=True)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        try:
            found = self._call(self._fs.find, base, reading=True)
        except FileNotFoundError:
            return []
        cut = len(self._root) + 1
        return sorted(p[cut:] for p in found)

    def delete(self, key: str) -> None:
        try:
            self._call(self._fs.rm_file, self._path(key), reading=True)
        except FileNotFoundError:
            pass


class MemoryStore:
    """A store in a dict, for unit tests; `down` makes every call fail as an
    unreachable store does."""

    def __init__(self, url: str = "memory://test", objects: dict[str, bytes] | None = None,
                 prefix: str = "") -> None:
        self.url, self._prefix = url, prefix
        self.objects: dict[str, bytes] = {} if objects is None else objects
        self.down = False

    def child(self, prefix: str) -> "MemoryStore":
        store = MemoryStore(f"{self.url}/{prefix}", self.objects, self._key(prefix) + "/")
        store.down = self.down
        return store

    def _key(self, key: str) -> str:
        if self.down:
            raise StoreError(self.url, ConnectionError("the store is down"))
        return f"{self._prefix}{key}"

    def read(self, key: str) -> bytes | None:
        return self.objects.get(self._key(key))

    def write(self, key: str, data: bytes) -> None:
        self.objects[self._key(key)] = bytes(data)

    def upload(self, key: str, local: Path) -> None:
        self.write(key, Path(local).read_bytes())

    def download(self, key: str, local: Path) -> bool:
        data = self.read(key)
        if data is not None:
            Path(local).write_bytes(data)
        return data is not None

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        return sorted(k[len(self._prefix):] for k in self.objects if k.startswith(full))

    def delete(self, key: str) -> None:
        self.objects.pop(self._key(key), None)


def open_store(url: str) -> Store:
    return FsspecStore(url)

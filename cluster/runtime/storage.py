"""Run directories and shard folders in object storage (s3://, gs://, or any URI pyarrow understands).

On a multi-node cluster the run root is usually a bucket. Ray Train writes its checkpoints to a URI storage path by
itself; everything else a job keeps in its run directory (metrics.jsonl, mlflow_run_id, samples/, best/, final/,
plots) is written by libraries that need a local path (safetensors, matplotlib, MLflow's artifact upload). So a
remote run directory has a node-local mirror: the job writes there and pushes what changed; a resumed job on another
node pulls the small state files first, so it continues the same MLflow run and the same metrics history.

Shards are memory-mapped by the loader, so remote shards are copied to a node-local cache once per node.
Local paths pass through everything here unchanged, so callers need no special case.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from gpt2.durable import PARTIAL_SUFFIX
from gpt2.shards import MANIFEST_NAME, SHARD_FILE, ShardFormatError, find_damaged_shards, read_manifest

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

CACHE_ENV = "GPT2_RAY_CACHE"  # where node-local mirrors and shard copies live; default ~/.cache/gpt2-ray
# Filesystems (pyarrow type names) that show a file while it is being written, so an upload goes to a temporary name
# first (see _upload_file); object stores (s3, gcs, abfs) publish an object only once its upload completes.
RENAMING_FILESYSTEMS = frozenset({"local", "hdfs"})


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2-ray")


def local_cache_dir(uri: str, kind: str) -> Path:
    """A node-local directory standing for `uri`: readable (the URI's own path) and unique (a hash of the whole URI)."""
    scheme, _, rest = uri.partition("://")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    name = rest.strip("/").replace("/", "_")[-80:]
    return cache_root() / kind / f"{scheme}_{name}_{digest}"


def absolute(location: str) -> str:
    """A location that means the same thing from any working directory: URIs as given, local paths made absolute."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with messages that do not name the setting
        raise ValueError(f"{uri}: cannot open this storage URI ({e})") from e


def resolve_filesystem(location: str, hf_filesystem: AbstractFileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a path or URI, and the path within it. `hf_filesystem` replaces
    `huggingface_hub.HfFileSystem()` for hf:// URIs (tests pass a local fsspec filesystem laid out like the hub)."""
    if location.startswith("hf://"):
        if hf_filesystem is None:
            from huggingface_hub import HfFileSystem  # imported on use: only hf:// needs it, and it loads slowly

            hf_filesystem = HfFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(hf_filesystem)), location.removeprefix("hf://")
    if "://" in location:
        return pafs.FileSystem.from_uri(location)  # s3://, gs://, file:// (credentials from the environment)
    return pafs.LocalFileSystem(), pafs.LocalFileSystem().normalize_path(str(Path(location).expanduser().resolve()))


def exists(location: str) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    fs, path = _filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


class RunDir:
    """A run directory that may live in object storage: `local` is where the job reads and writes; `push` and `pull`
    copy named files or folders between it and the remote directory (no-ops when the run directory is local)."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        self.remote = is_uri(location)
        self.local = local_cache_dir(self.location, "runs") if self.remote else Path(location)

    def __str__(self) -> str:
        return self.location

    def uri(self, name: str) -> str:
        return f"{self.location}/{name}"

    def push(self, *names: str) -> None:
        """Upload these entries of the local directory. Files are uploaded whole, and a folder's config.json (the
        file that makes a model directory loadable) last, so a reader never sees a config without its weights."""
        if not self.remote:
            return
        fs, root = _filesystem(self.location)
        for name in names:
            source = self.local / name
            if source.is_dir():
                files = sorted(p for p in source.rglob("*") if p.is_file())
                files.sort(key=lambda p: p.name == "config.json")
                for f in files:
                    _upload_file(f, fs, f"{root}/{name}/{f.relative_to(source).as_posix()}")
            elif source.is_file():
                _upload_file(source, fs, f"{root}/{name}")

    def pull(self, *names: str) -> None:
        """Download these entries (files or folders) when they exist remotely; missing ones are skipped, and so are
        the temporary files of uploads that were killed (see _upload_file)."""
        if not self.remote:
            return
        fs, root = _filesystem(self.location)
        for name in names:
            info = fs.get_file_info(f"{root}/{name}")
            if info.type == pafs.FileType.File:
                download_file(fs, info.path, self.local / name)
            elif info.type == pafs.FileType.Directory:
                for entry in fs.get_file_info(pafs.FileSelector(info.path, recursive=True)):
                    if entry.type == pafs.FileType.File and not entry.path.endswith(PARTIAL_SUFFIX):
                        download_file(fs, entry.path, self.local / name / entry.path[len(info.path) + 1:])


def _upload_file(source: Path, fs: pafs.FileSystem, path: str) -> None:
    """Upload one file so that a reader sees the previous version or the whole new one, never part of it.

    An object store makes an object visible only when its upload completes, so an upload killed midway leaves nothing
    and can go to the final name (a move there would be a copy, which S3 cannot even do for objects over 5 GB; note
    that pyarrow, having no abort, completes the upload of a stream closed by an exception). A filesystem (a file://
    mount, hdfs) shows a file while it is being written, so there the upload goes to a temporary name beside the
    target and is renamed when complete; an interrupted upload leaves only that temporary file, which pull skips.
    """
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    renames = fs.type_name in RENAMING_FILESYSTEMS
    target = f"{path}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}" if renames else path
    with open(source, "rb") as src, fs.open_output_stream(target) as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    if renames:
        fs.move(target, path)


def download_file(fs: pafs.FileSystem, path: str, target: Path) -> None:
    """Copy one file to `target` under a temporary name, renamed when complete: processes on one node may copy the
    same file at once, and a reader never sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    with fs.open_input_stream(path) as src, open(partial, "wb") as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    os.replace(partial, target)


def local_shards(location: str) -> str:
    """A local folder holding the shards at `location`: the folder itself, or this node's verified copy of a remote
    one (copied once; later calls and other workers on the node find the files in place)."""
    if not is_uri(location):
        return location
    return str(copy_shards_to_local(location, local_cache_dir(location, "shards")))


def local_run_root(root: str, job: str, field: str = "run.root") -> None:
    """Refuse a URI run root for a job whose run directory is only written locally (pretraining mirrors its run
    directory to object storage; the smaller jobs run on one node or on a shared filesystem)."""
    if is_uri(root):
        raise ValueError(
            f"{field}={root}: {job} writes its run directory on a filesystem; give a local or shared-filesystem path"
            " (URI run roots are supported by pretraining)"
        )


def copy_shards_to_local(uri: str, local_dir: str | os.PathLike, *, verify: bool = True) -> Path:
    """Copy a shard folder (manifest.json and *.bin) from s3://, gs://, hf:// or a local path to `local_dir`.

    The loader memory-maps shards, so remote shards are read from a local copy. Files already present with the
    right size are kept; each file is written under a temporary name and renamed, so concurrent workers on one node
    can call this safely. With `verify`, every shard listed in the manifest is checked against its sha256.
    """
    filesystem, root = resolve_filesystem(uri)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    entries = filesystem.get_file_info(pafs.FileSelector(root))
    wanted = [
        e
        for e in entries
        if e.type == pafs.FileType.File and (e.base_name == MANIFEST_NAME or SHARD_FILE.match(e.base_name))
    ]
    if not wanted:
        raise FileNotFoundError(f"{uri}: no {MANIFEST_NAME} or shard files")
    for entry in wanted:
        target = local / entry.base_name
        if target.exists() and target.stat().st_size == entry.size and entry.base_name != MANIFEST_NAME:
            continue
        download_file(filesystem, entry.path, target)
    if verify and (local / MANIFEST_NAME).exists():
        damaged = find_damaged_shards(local, read_manifest(local / MANIFEST_NAME)["shards"])
        if damaged:
            raise ShardFormatError(f"copy of {uri} in {local} is damaged: {damaged}")
    return local

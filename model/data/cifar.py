"""CIFAR-10 as JPEG files: extracted once from the shared archive into the git-ignored cache."""

from __future__ import annotations

import fcntl
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_CIFAR_ARCHIVE",
    "DEFAULT_DATA_CACHE",
    "ensure_cifar10",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CIFAR_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_DATA_CACHE = REPO_ROOT / ".cache" / "data"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_TOP = "cifar10"
MARKER = ".extracted"


def _check_member(member: tarfile.TarInfo, source: Path) -> None:
    """A member must be a plain file or folder strictly inside ``cifar10/``: no links, no absolute
    paths, no ``..`` (an archive must not write outside the cache)."""
    parts = PurePosixPath(member.name).parts
    unsafe = (
        member.name.startswith(("/", "\\"))
        or ".." in parts
        or not parts
        or parts[0] != _TOP
        or not (member.isfile() or member.isdir())
    )
    if unsafe:
        raise ValueError(f"{source}: refusing unsafe or unexpected archive member {member.name!r}")


def _verify_layout(root: Path, source: Path) -> int:
    """The extracted tree must hold train/ and test/, each with the ten class folders."""
    count = 0
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            files = list(folder.glob("*.jpg")) if folder.is_dir() else []
            if not files:
                raise ValueError(f"{source}: archive lacks {_TOP}/{split}/{name}/*.jpg")
            count += len(files)
    return count


def ensure_cifar10(archive: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Return ``<cache_dir>/cifar10`` (holding ``{train,test}/<class>/<NNNN>.jpg``), extracting
    ``archive`` there the first time.

    Defaults: the archive ``../shared/data/cifar10-jpeg.tar.gz`` beside the checkout, the cache
    ``<repo>/.cache/data``. A marker file written after a complete, verified extraction makes later
    calls free; a partial extraction (no marker) is discarded and redone. A file lock keeps
    concurrent callers from extracting twice.
    """
    archive = Path(archive) if archive is not None else DEFAULT_CIFAR_ARCHIVE
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_DATA_CACHE
    target = cache_dir / _TOP
    if (target / MARKER).is_file():
        return target
    if not archive.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 archive {archive} is absent: pass archive= (cifar10-jpeg.tar.gz with "
            f"{_TOP}/{{train,test}}/<class>/*.jpg) or place it at {DEFAULT_CIFAR_ARCHIVE}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{_TOP}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MARKER).is_file():  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{_TOP}-") as scratch:
            # Stream mode: one decompression pass; each member is checked before it is written,
            # and a refusal discards the scratch folder with whatever was written so far.
            with tarfile.open(archive, "r|*") as tar:
                for member in tqdm(tar, desc=f"extracting {archive.name}", unit="file"):
                    _check_member(member, archive)
                    tar.extract(member, scratch, filter="data")
            extracted = Path(scratch) / _TOP
            count = _verify_layout(extracted, archive)
            shutil.rmtree(target, ignore_errors=True)
            extracted.rename(target)
        (target / MARKER).write_text(f"{archive.resolve()}\n{count} images\n")
    return target

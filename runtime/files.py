"""Files written whole or not at all, and content hashes."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk_mib: int = 8) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_mib << 20):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Readers see the old file or the complete new one, never a half-written one. The temporary
    name keeps the suffix, so writers that pick a format by extension (PNG, ONNX) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str))


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.replaced")


def staging_dir(dest: str | Path) -> Path:
    """An empty folder beside ``dest`` to build its replacement in (any leftover of a crash removed)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def recover_dir(dest: str | Path) -> Path:
    """Finish or undo a :func:`replace_dir` that was interrupted, so ``dest`` is a complete folder again.

    If ``dest`` is missing but its moved-aside old copy exists, the old copy goes back; if both
    exist, the swap had happened and the old copy is deleted. Cheap when there is nothing to do.
    """
    dest = Path(dest)
    aside = _aside(dest)
    if aside.exists():
        if dest.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, dest)
            log.warning("%s: an interrupted replacement was undone; the previous folder is back", dest)
    return dest


def replace_dir(staged: str | Path, dest: str | Path, _interrupt: Callable[[str], None] | None = None) -> Path:
    """Move the complete folder ``staged`` to ``dest``, replacing any old ``dest``, crash-safely.

    Steps: fsync every file of ``staged``; move the old ``dest`` aside; rename ``staged`` to
    ``dest``; delete the old one. An interruption at any point leaves the complete old folder or
    the complete new one, at ``dest`` or aside, and :func:`recover_dir` (which every call and the
    readers run first) puts it back. ``_interrupt(step)`` is a test hook called between steps.
    """
    staged, dest = Path(staged), Path(dest)
    hook = _interrupt or (lambda step: None)
    recover_dir(dest)
    for root, _, names in os.walk(staged):
        for name in names:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    hook("synced")
    aside = _aside(dest)
    if dest.exists():
        os.replace(dest, aside)
    hook("moved_aside")
    os.replace(staged, dest)
    _fsync(dest.parent)
    hook("swapped")
    shutil.rmtree(aside, ignore_errors=True)
    return dest

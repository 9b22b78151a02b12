"""Crash-safe files and folders: an interruption at any step leaves a complete old or new version."""
from __future__ import annotations

import pytest

from edgeseg.runtime.files import atomic_path, recover_dir, replace_dir, staging_dir

STEPS = ("synced", "moved_aside", "swapped")


class Crash(Exception):
    pass


def _folder(path, version: str, n: int = 3):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"{i}.txt").write_text(f"{version} {i}")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "manifest.json").write_text(version)


def _version(path) -> str:
    """'old' or 'new' if the folder is complete and of one version, else raise."""
    texts = {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}
    assert set(texts) == {"0.txt", "1.txt", "2.txt", "sub/manifest.json"}, texts
    (version,) = {t.split()[0] for t in texts.values()}
    return version


@pytest.mark.parametrize("step", STEPS)
def test_replace_dir_interrupted_at_each_step_leaves_a_complete_folder(tmp_path, step):
    dest = tmp_path / "bundle"
    _folder(dest, "old")
    staged = staging_dir(dest)
    _folder(staged, "new")

    def hook(at):
        if at == step:
            raise Crash(at)

    with pytest.raises(Crash):
        replace_dir(staged, dest, _interrupt=hook)
    recover_dir(dest)  # what the next reader or writer does first
    assert _version(dest) == ("old" if step in ("synced", "moved_aside") else "new")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle.replaced")] == []
    # and the next replacement goes through
    staged = staging_dir(dest)
    _folder(staged, "new")
    replace_dir(staged, dest)
    assert _version(dest) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_replace_dir_without_an_old_folder_and_a_leftover_staging_dir(tmp_path):
    dest = tmp_path / "set"
    leftover = tmp_path / ".set.tmp"
    leftover.mkdir()
    (leftover / "junk").write_text("half-written")
    staged = staging_dir(dest)
    assert staged == leftover and list(staged.iterdir()) == []  # a crashed attempt's files are gone
    _folder(staged, "new")
    replace_dir(staged, dest)
    assert _version(dest) == "new"


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(Crash):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Crash()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

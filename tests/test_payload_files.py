"""Delta payload files beside the coordinator's database (coordinator.payload_files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coordinator.payload_files import PayloadFiles, payload_name


@pytest.mark.parametrize("durable", [True, False])
def test_a_placed_payload_reads_back_whether_written_or_moved(tmp_path: Path, durable: bool) -> None:
    files = PayloadFiles(tmp_path / "deltas", durable=durable)
    files.place(payload_name("dev-a", 1), b"\x00\x01" * 1000)
    staged = tmp_path / "upload.part"
    staged.write_bytes(b"moved bytes")
    files.place(payload_name("dev-a", 2), None, staged)
    assert files.read("dev-a.1.delta") == b"\x00\x01" * 1000
    assert files.read("dev-a.2.delta") == b"moved bytes" and not staged.exists()


def test_durable_placement_fsyncs_the_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    PayloadFiles(tmp_path / "fast", durable=False).place("d.1.delta", b"x")
    assert synced == []
    PayloadFiles(tmp_path / "safe", durable=True).place("d.1.delta", b"x")
    assert len(synced) == 2  # the file, then the folder's entry for it


def test_orphans_go_and_named_payloads_stay(tmp_path: Path) -> None:
    files = PayloadFiles(tmp_path / "deltas", durable=False)
    for seq in (1, 2, 3):
        files.place(payload_name("dev", seq), b"p")
    (files.folder / "notes.txt").write_text("not a payload")
    files.remove_orphans({"dev.2.delta"})
    assert sorted(p.name for p in files.folder.iterdir()) == ["dev.2.delta", "notes.txt"]
    files.remove(["dev.2.delta", "dev.9.delta"])  # a missing file is no error
    assert sorted(p.name for p in files.folder.iterdir()) == ["notes.txt"]

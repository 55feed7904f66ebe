"""storage.io_threads_for: threads for S3 and network file systems, one for local disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from keeper_core import storage
from keeper_core.storage import LOCAL_FILESYSTEMS, io_threads_for, parse_mountinfo

# /proc/self/mountinfo as Linux writes it: optional fields before " - ", a space in a mount
# point as \040, mounts listed in no particular order.
MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "40 27 0:50 / /mnt/nas rw,relatime shared:30 master:2 - nfs4 nas:/photos rw,vers=4.2\n"
    "41 40 253:2 / /mnt/nas/local\\040cache rw,relatime - xfs /dev/vdb rw\n"
    "42 27 0:51 / /mnt/drive rw,nosuid - fuse.rclone gdrive: rw,user_id=0\n"
    "43 27 0:52 / /scratch rw - tmpfs tmpfs rw,size=1g\n"
)


def test_mountinfo_is_read_longest_mount_point_first_with_escapes_decoded() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[0] == ("/mnt/nas/local cache", "xfs")
    assert ("/mnt/nas", "nfs4") in mounts
    assert ("/", "ext4") in mounts
    assert [len(p) for p, _ in mounts] == sorted((len(p) for p, _ in mounts), reverse=True)
    assert parse_mountinfo("garbage\n\n1 2 3\n") == []


@pytest.mark.parametrize(
    ("paths", "threads"),
    [
        (["/home/ana/photos/IMG_1.xmp", "/scratch/x/IMG_2.xmp"], 1),  # ext4 and tmpfs
        (["/mnt/nas/2026/IMG_1.xmp"], 16),  # NFS
        (["/mnt/nas/local cache/IMG_1.xmp"], 1),  # a local disk mounted inside the NFS share
        (["/mnt/nasty/IMG_1.xmp"], 1),  # a name that starts like /mnt/nas, on the root disk
        (["/home/ana/IMG_1.xmp", "/mnt/drive/IMG_2.xmp"], 16),  # one file remote: threads
        (["/home/ana/IMG_1.xmp", "s3://bucket/IMG_2.xmp"], 16),
        ([], 1),
    ],
)
def test_threads_only_where_a_file_is_remote(paths: list[str], threads: int) -> None:
    assert io_threads_for(paths, 16, mountinfo=MOUNTINFO) == threads


def test_a_symlinked_folder_counts_where_it_points(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    here = str(tmp_path.resolve())
    info = f"27 1 253:1 / / rw - ext4 /dev/vda1 rw\n50 27 0:60 / {here}/real rw - cifs //s/p rw\n"
    assert io_threads_for([str(tmp_path / "link" / "IMG_1.xmp")], 8, mountinfo=info) == 8
    assert io_threads_for([str(tmp_path / "other" / "IMG_1.xmp")], 8, mountinfo=info) == 1


def test_one_thread_asked_is_one_and_unreadable_mounts_keep_the_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert io_threads_for(["s3://b/k.xmp"], 1) == 1
    monkeypatch.setattr(storage, "_MOUNTINFO", str(tmp_path / "no-such-file"))
    assert io_threads_for([str(tmp_path / "IMG_1.xmp")], 16) == 16  # not Linux: as asked


def test_this_machines_temporary_folder(tmp_path: Path) -> None:
    """On Linux (CI's machine) the temporary folder is a local disk: one thread. Where there is
    no mount table to read (macOS), the threads asked for."""
    table = Path("/proc/self/mountinfo")
    if not table.exists():
        assert io_threads_for([str(tmp_path / "IMG_1.xmp")], 16) == 16
        return
    mounts = parse_mountinfo(table.read_text())
    real = str(tmp_path.resolve())
    fstype = next(t for p, t in mounts if real == p or real.startswith(p.rstrip("/") + "/"))
    assert fstype in LOCAL_FILESYSTEMS, fstype
    assert io_threads_for([str(tmp_path / "IMG_1.xmp")], 16) == 1


def test_fsynced_files_keep_the_threads_on_a_local_disk() -> None:
    local = ["/home/ana/photos/IMG_1.xmp"]
    assert io_threads_for(local, 16, mountinfo=MOUNTINFO) == 1
    assert io_threads_for(local, 16, fsync=True, mountinfo=MOUNTINFO) == 16
    assert io_threads_for(local, 1, fsync=True, mountinfo=MOUNTINFO) == 1

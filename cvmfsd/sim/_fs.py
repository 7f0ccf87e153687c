"""The read-only FUSE file system of the simulated ``cvmfs2`` (pyfuse3 on trio).

Inodes are stable per path across revisions (see :class:`Inodes`), so a new
revision swaps the tree under the same numbers. Kernel entry and attribute
caches are kept for one second, which bounds how long a published change can
stay invisible after the client picked it up.

Faults: while :attr:`Client.hanging` is set, every handler awaits forever,
which is what a stuck daemon looks like to the kernel (the caller sits in D
state until the process dies). Reads of a path selected by the ``eio`` fault
fail with EIO and are counted like real I/O errors.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

import pyfuse3
import trio

from cvmfsd.sim import _report
from cvmfsd.sim._client import Client, OpenFile
from cvmfsd.sim._fetch import DownloadError
from cvmfsd.sim.stratum import Entry

_CACHE_SECONDS = 1.0
_TYPE_BITS = {"d": stat.S_IFDIR, "f": stat.S_IFREG, "l": stat.S_IFLNK}


class CvmfsOperations(pyfuse3.Operations):
    """FUSE handlers serving :attr:`Client.tree`."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.uid = os.getuid()
        self.gid = os.getgid()

    async def _gate(self) -> None:
        """Stall forever when the hang fault is active."""
        if self.client.hanging:
            await trio.sleep_forever()

    def _entry(self, ino: int) -> tuple[str, Entry]:
        path = self.client.inodes.path(ino)
        entry = None if path is None else self.client.tree.catalog.get(path)
        if path is None or entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # gone in the current revision
        return path, entry

    def _attrs(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.st_mode = _TYPE_BITS[str(entry["type"])] | int(entry["mode"])
        attrs.st_nlink = 2 if entry["type"] == "d" else 1
        attrs.st_size = int(entry["size"])
        attrs.st_uid = self.uid  # like CVMFS_CLAIM_OWNERSHIP=yes
        attrs.st_gid = self.gid
        attrs.st_blksize = 4096
        attrs.st_blocks = (attrs.st_size + 511) // 512
        mtime_ns = int(entry["mtime"]) * 1_000_000_000
        attrs.st_atime_ns = attrs.st_ctime_ns = attrs.st_mtime_ns = mtime_ns
        attrs.entry_timeout = _CACHE_SECONDS
        attrs.attr_timeout = _CACHE_SECONDS
        return attrs

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._gate()
        self.client.counters.inc("cvmfs.n_fs_lookup")
        parent, _ = self._entry(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            path = parent
        elif text == "..":
            path = parent.rpartition("/")[0]
        else:
            path = self.client.tree.join(parent, text)
        entry = self.client.tree.catalog.get(path)
        if entry is None:
            self.client.counters.inc("cvmfs.n_fs_lookup_negative")
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self.client.inodes.ino(path)
        return self._attrs(ino, entry)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes stay allocated by path; forgetting only counts.
        self.client.counters.inc("cvmfs.n_fs_forget", len(inode_list))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._gate()
        self.client.counters.inc("cvmfs.n_fs_stat")
        _, entry = self._entry(inode)
        return self._attrs(inode, entry)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self._gate()
        self.client.counters.inc("cvmfs.n_fs_readlink")
        _, entry = self._entry(inode)
        if entry["type"] != "l":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(str(entry["target"]))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._gate()
        path, entry = self._entry(inode)
        if entry["type"] != "d":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self.client.counters.inc("cvmfs.n_fs_dir_open")
        fh = self.client.new_fh()
        self.client.dirs[fh] = path
        self.client.update_open_gauges()
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._gate()
        path = self.client.dirs[fh]
        tree = self.client.tree
        names = tree.children.get(path, ())
        for index in range(start_id, len(names)):
            child = tree.join(path, names[index])
            entry = tree.catalog[child]
            attrs = self._attrs(self.client.inodes.ino(child), entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attrs, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.client.dirs.pop(fh, None)
        self.client.update_open_gauges()

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self._gate()
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        path, entry = self._entry(inode)
        if entry["type"] != "f":
            raise pyfuse3.FUSEError(errno.EISDIR if entry["type"] == "d" else errno.EINVAL)
        client = self.client
        client.counters.inc("cvmfs.n_fs_open")
        if len(client.files) >= client.settings.maxfd:
            raise pyfuse3.FUSEError(errno.EMFILE)
        try:
            cached = await trio.to_thread.run_sync(client.fetcher.fetch, str(entry["hash"]))
            fd = os.open(cached, os.O_RDONLY)
        except (DownloadError, OSError) as exc:
            client.record_io_error(path, f"fetch failed: {exc}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        fh = client.new_fh()
        client.files[fh] = OpenFile(fd=fd, path=path)
        client.update_open_gauges()
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self._gate()
        client = self.client
        client.counters.inc("cvmfs.n_fs_read")
        handle = client.files[fh]
        if client.eio_for(handle.path):
            client.record_io_error(handle.path, "simulated I/O error")
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(handle.fd, size, off)

    async def release(self, fh: int) -> None:
        handle = self.client.files.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
        self.client.update_open_gauges()

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        await self._gate()
        self._entry(inode)
        text = os.fsdecode(name)
        value = _report.xattr(self.client, text[5:]) if text.startswith("user.") else None
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        # The real default (CVMFS_HIDE_MAGIC_XATTRS / visibility "rootonly")
        # hides the magic attributes from listing; getxattr still answers.
        await self._gate()
        self._entry(inode)
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # Like cvmfs_statfs: capacity is the cache quota, usage the cache size.
        await self._gate()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        total = max(self.client.settings.quota_limit_mb, 0) * 1024 * 1024 // 4096
        used = self.client.fetcher.cache_bytes // 4096
        data.f_blocks = total
        data.f_bfree = data.f_bavail = max(total - used, 0)
        data.f_files = self.client.inodes.max
        data.f_namemax = 255
        return data

"""Opening the files a target maps, exactly as it sees them, defensively.

Two rules for every file that another user may control (a binary, its
debug file, a perf map, anything under /proc/PID/root):

* **Open without blocking, read only regular files, bounded.**
  ``open_untrusted`` opens with O_NONBLOCK (a FIFO planted at the path
  cannot block ``open``), O_NOCTTY and O_CLOEXEC, then ``fstat``s the
  descriptor it got (not the path: no race) and refuses anything but a
  regular file (/dev/zero, a FIFO, a socket, a directory).  Sizes are
  capped by the caller.
* **Never mmap what someone else can truncate.**  A mapped file shrunk
  under us kills the agent with SIGBUS.  Only files owned by root, not
  writable by group or others, and reached in the agent's own mount
  namespace are mapped; anything else is read into memory (bounded), where
  a concurrent truncation only makes the data short, which the parsers
  reject as malformed.

``open_as_seen(pid, mapping)`` is the one way to get "the file the process
has mapped": through the process's root (``openat2(RESOLVE_IN_ROOT)``
where the kernel has it, so the container's absolute symlinks resolve
inside the container), then ``/proc/PID/map_files/START-END`` (the mapped
file itself, also when deleted or replaced).  A candidate is accepted only
when its (device, inode) equal the mapping's; there is no fallback to
"whatever is at that path now".

``create_in_root`` / ``exists_in_root`` / ``remove_in_root``: the one file
the agent ever puts in a target's root (a PEP 768 script), created
exclusively, owned by the target's user, in a directory reached without
following any symlink and that no other user can tamper with.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat as _stat
from typing import Optional, Tuple, Union

from perfagent.records import NamedTuple
from perfagent import libc as _libc

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)

#: The most of one file read into memory when it may not be mapped.
MAX_READ_BYTES = 1 << 30

# include/uapi/linux/openat2.h
#   struct open_how { __u64 flags; __u64 mode; __u64 resolve; };
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class open_how(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_OPENAT2_NR = {"x86_64": 437, "aarch64": 437}
_openat2_ok: Optional[bool] = None


class NotRegularFile(OSError):
    """The path names something other than a regular file."""


class SeenFile(NamedTuple):
    """An open regular file: its descriptor, fstat, and where it was opened."""

    fd: int
    st: os.stat_result
    path: str        # what was opened (for messages)
    mappable: bool   # safe to mmap (see the module docstring)


def _check_regular(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "%s is not a regular file" % path)
    return st


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & (_stat.S_IWGRP | _stat.S_IWOTH)


_own_mnt_ns: Optional[int] = None


def same_mount_namespace(pid: int) -> bool:
    """True when process ``pid`` shares the agent's mount namespace."""
    global _own_mnt_ns
    try:
        if _own_mnt_ns is None:
            _own_mnt_ns = os.stat("/proc/self/ns/mnt").st_ino
        return os.stat("/proc/%d/ns/mnt" % pid).st_ino == _own_mnt_ns
    except OSError:
        return False


def open_untrusted(path: str, own_namespace: bool = True) -> SeenFile:
    """Open ``path`` for reading without blocking; only a regular file.

    ``own_namespace``: the path was resolved in the agent's own mount
    namespace (not through another process's root), a condition for
    mapping it.  Raises OSError (NotRegularFile for devices, FIFOs...).
    """
    fd = os.open(path, _OPEN_FLAGS)
    st = _check_regular(fd, path)
    return SeenFile(fd, st, path, own_namespace and _trusted_owner(st))


def open_in_root(pid: int, path: str) -> SeenFile:
    """``path`` as process ``pid`` sees it, resolved inside its root.

    With openat2(RESOLVE_IN_ROOT) (Linux 5.6+) absolute symlinks and ``..``
    inside the process's root stay inside it; without it, plain open of
    /proc/PID/root/PATH (whose symlinks could escape the container: the
    (device, inode) check of open_as_seen still refuses a wrong file).
    """
    global _openat2_ok
    own = same_mount_namespace(pid)
    if _openat2_ok is not False and not own:
        try:
            root = os.open("/proc/%d/root" % pid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            root = -1
        if root >= 0:
            try:
                fd = _openat2(root, path.lstrip("/") or ".")
                _openat2_ok = True
                st = _check_regular(fd, path)
                return SeenFile(fd, st, "/proc/%d/root%s" % (pid, path), False)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
                if exc.errno == errno.ENOSYS:
                    _openat2_ok = False
            finally:
                os.close(root)
    return open_untrusted("/proc/%d/root%s" % (pid, path), own_namespace=own)


def _openat2(dirfd: int, path: str) -> int:
    from perfagent import arch
    nr = _OPENAT2_NR.get(arch.current().NAME)
    if nr is None:
        raise OSError(errno.ENOSYS, "openat2 unknown on this architecture")
    how = open_how(_OPEN_FLAGS, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    ret = _libc.libc().syscall(nr, ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                               ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "openat2 %s: %s" % (path, os.strerror(err)))
    return ret


def same_device_inode(st: os.stat_result, dev_major: int, dev_minor: int, inode: int) -> bool:
    """Does ``st`` describe the file a maps line / MMAP2 record names?"""
    return (st.st_ino == inode and os.major(st.st_dev) == dev_major
            and os.minor(st.st_dev) == dev_minor)


def open_as_seen(pid: int, path: str, dev_major: int, dev_minor: int, inode: int,
                 start: int = 0, end: int = 0, deleted: bool = False) -> Tuple[Optional[SeenFile], str]:
    """The file process ``pid`` maps at [start, end) as ``path``, or (None, why).

    Tried in order: ``path`` inside the process's root, then the mapping's
    own /proc/PID/map_files entry (while the process lives).  Each is
    accepted only when its device and inode are the mapping's; a mapping
    without an inode (unknown) is only opened through map_files, which is
    the mapped file by construction.
    """
    why = "not found"
    if inode and path.startswith("/") and not deleted:
        try:
            seen = open_in_root(pid, path)
        except OSError as exc:
            why = "%s: %s" % (path, exc.strerror or exc)
        else:
            if same_device_inode(seen.st, dev_major, dev_minor, inode):
                return seen, ""
            os.close(seen.fd)
            why = "%s is no longer the mapped file (device/inode differ)" % path
    if start and end:
        link = "/proc/%d/map_files/%x-%x" % (pid, start, end)
        try:
            seen = open_untrusted(link, own_namespace=same_mount_namespace(pid))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH):
                why += "; %s: %s" % (link, exc.strerror or exc)
        else:
            if not inode or same_device_inode(seen.st, dev_major, dev_minor, inode):
                return seen, ""
            os.close(seen.fd)
            why += "; map_files entry differs"
    return None, why


def load_contents(seen: SeenFile, max_bytes: int = MAX_READ_BYTES) -> Union[mmap.mmap, bytes]:
    """The file's bytes: an mmap when safe, else a bounded copy.  Closes the fd."""
    try:
        size = seen.st.st_size
        if seen.mappable and size > 0:
            try:
                return mmap.mmap(seen.fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                pass
        if size > max_bytes:
            raise OSError(errno.EFBIG, "%s: %d bytes is more than the %d this agent reads"
                          % (seen.path, size, max_bytes))
        chunks = []
        got = 0
        limit = min(max(size, 0), max_bytes) if size else max_bytes
        while got < limit:
            chunk = os.pread(seen.fd, min(1 << 24, limit - got), got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(seen.fd)


# ------------------------------------------------- files placed in a target

def _open_dir_in_root(pid: int, directory: str, owner_uid: int) -> int:
    """A descriptor of ``directory`` as process ``pid`` sees it, walked one
    component at a time from its root with O_NOFOLLOW (a symlink anywhere,
    which could point outside the root, is refused), and only if nobody but
    root or ``owner_uid`` can replace what we put there: owned by one of
    them, and sticky when others may write it."""
    fd = os.open("/proc/%d/root" % pid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in directory.split("/") if p]:
            if part in (".", ".."):
                raise OSError(errno.EINVAL, "%s: '.' and '..' are not allowed" % directory)
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        writable_by_others = st.st_mode & (_stat.S_IWGRP | _stat.S_IWOTH)
        if st.st_uid not in (0, owner_uid) or (writable_by_others and not st.st_mode & _stat.S_ISVTX):
            raise OSError(errno.EPERM, "%s in process %d's root may be changed by another user" % (directory, pid))
        return fd
    except BaseException:
        os.close(fd)
        raise


def create_in_root(pid: int, directory: str, name: str, data: bytes, uid: int, gid: int,
                   mode: int = 0o600) -> str:
    """Create the new file ``directory/name`` inside process ``pid``'s root,
    owned by ``uid``:``gid`` (so that the process can read and remove it),
    holding ``data``; its path as the process sees it.

    Exclusive (O_EXCL: never an existing file), no symlink followed on the
    way (see _open_dir_in_root).  For the one thing the agent hands a
    target: the script of a PEP 768 remote exec.
    """
    if "/" in name or name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "bad file name %r" % name)
    dfd = _open_dir_in_root(pid, directory, uid)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=dfd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dfd)
            raise
        os.close(fd)
    finally:
        os.close(dfd)
    return directory.rstrip("/") + "/" + name


def exists_in_root(pid: int, directory: str, name: str, uid: int) -> bool:
    """Is ``directory/name`` (made by create_in_root) still there?"""
    dfd = _open_dir_in_root(pid, directory, uid)
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


def remove_in_root(pid: int, directory: str, name: str, uid: int) -> bool:
    """Remove ``directory/name`` (made by create_in_root); False if already gone."""
    dfd = _open_dir_in_root(pid, directory, uid)
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)

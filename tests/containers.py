"""Targets run "in a container", for tests that need real namespaces and cgroups.

``tools/build_debian_root.sh`` builds, once per machine, a minimal Debian
sid root with Debian's own ``python3.14`` and ``python3.15`` (stripped,
non-PIE, the runtime linked into the executable) into
``${PERFAGENT_DEBIAN_ROOT:-/var/cache/perfagent/debian-sid}``.
``debian_root()`` returns it or skips the test (fails it when
``PERFAGENT_REQUIRE_DEBIAN_ROOT=1``, as CI sets after building it).

``run_in_container(argv, ...)`` starts ``argv`` the way a container runtime
would, without one:

* a cgroup directory named as the runtime names it (``CGROUP_STYLES``:
  docker's systemd layout ``system.slice/docker-<64 hex>.scope``, the
  Kubernetes ``kubepods.slice/...-pod<uid>.slice/cri-containerd-<id>.scope``
  one, ...), in the cgroup v2 hierarchy (``/sys/fs/cgroup``, or
  ``/sys/fs/cgroup/unified`` on a hybrid machine; a v1 hierarchy when there
  is no v2).  The process moves itself in (``preexec_fn``) before it execs
  anything, so the target never runs outside it;
* ``unshare --pid --mount --fork --kill-child``: new pid and mount
  namespaces; the forked child is the namespace's init.  It bind-mounts the
  root on itself and mounts a fresh ``/proc`` (of the new pid namespace), a
  tmpfs on ``/tmp``, a tmpfs ``/dev`` with null, zero, full, random,
  urandom, tty, fd, std* and a ``/dev/shm`` inside it (private mounts: the
  host never sees them), then switches into it: ``rootfs="pivot"``
  (default) with ``pivot_root`` like runc, so that /proc/PID/maps read from
  the host names files as the container sees them (``/usr/bin/python3.14``),
  or ``rootfs="chroot"`` with ``chroot``, where maps names them by their host
  paths (``ROOT/usr/bin/python3.14``, as for a daemon chrooted on the host).
  The target is exec'd: it is the namespace's pid 1, like a container's
  entrypoint; ``init=True`` keeps a shell as pid 1 and runs the target as its
  child, like ``docker --init``.

``ContainerProcess`` gives the test the target's *host* pid (the
interpreter, found among the wrapper's descendants by its executable's
device and inode), its pid inside the namespace, the container id and pod
uid it was given, and ``workdir``: a per-test directory inside the root
(``/srv/perfagent-test.XXXXXX``) holding the ``files`` it was asked to copy.
``close()`` (also on ``with`` exit, whatever the test did) kills the
namespace's init (the kernel then kills everything in the namespace, and
the private mounts go with the mount namespace), waits, removes the cgroup
directories it created and the per-test directory.  If the test process
itself dies, the wrapper gets SIGKILL (PR_SET_PDEATHSIG) and unshare's
``--kill-child`` takes the namespace with it.

This module reads /proc directly: it is test plumbing, the ground truth the
agent's own readers (perfagent.target) are compared with.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

DEFAULT_ROOT = "/var/cache/perfagent/debian-sid"
VERSIONS = ("3.14", "3.15")
STAMP = ".perfagent-root"   # written by tools/build_debian_root.sh when complete
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: How long starting a target may take before it counts as failed (a
#: bound on a wait, not a measurement).
START_TIMEOUT = 30.0

#: cgroup directory of one container, relative to the hierarchy's root, per
#: runtime (format fields: id = 64 hex digits, pod = the pod uid with "_"
#: for "-", as systemd slice names spell it).
CGROUP_STYLES: Dict[str, str] = {
    "docker": "system.slice/docker-{id}.scope",
    "docker-cgroupfs": "docker/{id}",
    "podman": "machine.slice/libpod-{id}.scope/container",
    "k8s": ("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod}.slice/"
            "cri-containerd-{id}.scope"),
    "k8s-crio": ("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod}.slice/"
                 "crio-{id}.scope"),
}
#: Styles whose path names a pod.
POD_STYLES = ("k8s", "k8s-crio")

# prctl(2)
PR_SET_PDEATHSIG = 1

# Run by the host's /bin/sh as the new namespaces' init: $1 is the root, $2
# "pivot" or "chroot", $3 "init" or "exec", the rest the target's argv.  The
# root is bind-mounted on itself (a mount of its own, as a runtime's rootfs
# is), the pseudo file systems are mounted inside it, then either
#   pivot: pivot_root . . and the old root detached (what runc does): the
#          root is the namespace's root mount, so /proc/PID/maps read from
#          the host names files as the container sees them (/usr/bin/...);
#   chroot: chroot into it: the mount tree is the host's, and maps read from
#          the host names files by their host paths (ROOT/usr/bin/...).
# Every command before the switch is the host's; after it (umount, the
# target) the root's.
_INNER = r"""
set -e
root=$1; how=$2; mode=$3; shift 3
mount --bind "$root" "$root"
cd "$root"
mount -t proc -o nosuid,nodev,noexec proc proc
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs tmp
mount -t tmpfs -o nosuid,noexec,mode=755 dev dev
mknod -m 666 dev/null c 1 3
mknod -m 666 dev/zero c 1 5
mknod -m 666 dev/full c 1 7
mknod -m 666 dev/random c 1 8
mknod -m 666 dev/urandom c 1 9
mknod -m 666 dev/tty c 5 0
ln -s /proc/self/fd dev/fd
ln -s /proc/self/fd/0 dev/stdin
ln -s /proc/self/fd/1 dev/stdout
ln -s /proc/self/fd/2 dev/stderr
mkdir dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 shm dev/shm
if [ "$how" = pivot ]; then
    pivot_root . .
    umount -l .
    cd /
else
    set -- chroot "$root" "$@"
fi
if [ "$mode" = exec ]; then
    exec "$@"
fi
"$@" &
wait $!
"""


# ------------------------------------------------------------------ root --

def root_dir() -> str:
    return (os.environ.get("PERFAGENT_DEBIAN_ROOT") or DEFAULT_ROOT).rstrip("/")


def root_built(root: Optional[str] = None) -> bool:
    """Does ``root`` (default: root_dir()) hold a complete root with every interpreter?"""
    root = root or root_dir()
    return os.path.isfile(os.path.join(root, STAMP)) and all(
        os.access(os.path.join(root, "usr/bin/python" + v), os.X_OK) for v in VERSIONS)


def _missing(message: str) -> None:
    import pytest
    if os.environ.get("PERFAGENT_REQUIRE_DEBIAN_ROOT") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def debian_root() -> str:
    """The Debian sid root's path; skip (or fail, when
    ``PERFAGENT_REQUIRE_DEBIAN_ROOT=1``) the calling test when it is absent,
    or when this process cannot make namespaces and cgroups (not root)."""
    root = root_dir()
    if not root_built(root):
        _missing("no Debian sid root at %s: run tools/build_debian_root.sh" % root)
    if os.geteuid() != 0:
        _missing("running targets in a container needs root (namespaces, chroot, cgroups)")
    return root


def debian_python(version: str) -> str:
    """``/usr/bin/python<version>``, the interpreter's path inside the root."""
    if version not in VERSIONS:
        raise ValueError("no python%s in the Debian root (one of %s)" % (version, ", ".join(VERSIONS)))
    return "/usr/bin/python" + version


# --------------------------------------------------------------- cgroups --

def _mountinfo() -> List[Tuple[str, str, str, str]]:
    """(mount root, mount point, fstype, super options) of our mounts."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) >= 5 and len(b) >= 3:
                out.append((a[3], a[4], b[0], b[2]))
    return out


def cgroup_hierarchy() -> Tuple[str, str, str]:
    """(mount point, mount root, "v2" or "v1") of the hierarchy containers
    are placed in.  The mount root is the mounted directory as our cgroup
    namespace names it ("/" unless we run in a nested cgroup namespace):
    /proc/PID/cgroup paths of processes under the mount start with it.

    cgroup v2 (/sys/fs/cgroup on unified machines, /sys/fs/cgroup/unified on
    hybrid ones); without it, v1's name=systemd hierarchy (where a systemd
    container runtime names its scopes), else any v1 hierarchy.
    """
    mounts = _mountinfo()
    v2 = sorted(((point, root) for root, point, fstype, _ in mounts if fstype == "cgroup2"),
                key=lambda m: len(m[0]))
    if v2:
        return v2[0][0], v2[0][1], "v2"
    v1 = sorted((point, root, opts) for root, point, fstype, opts in mounts if fstype == "cgroup")
    for point, root, opts in v1:
        if "name=systemd" in opts.split(","):
            return point, root, "v1"
    if v1:
        return v1[0][0], v1[0][1], "v1"
    raise RuntimeError("no cgroup hierarchy is mounted")


# ------------------------------------------------------------- processes --

def _children(pid: int) -> List[int]:
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def _exe_id(pid: int) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat("/proc/%d/exe" % pid)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def ns_pids_of(pid: int) -> Tuple[int, ...]:
    """NSpid of ``pid`` (outermost first), read directly (ground truth)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("NSpid:"):
                return tuple(int(v) for v in line.split()[1:])
    return ()


def _resolve_in_root(root: str, path: str) -> str:
    """The host path of the file ``path`` names inside ``root`` (symlinks
    followed inside the root; relative names searched in CONTAINER_PATH)."""
    if "/" not in path:
        for d in CONTAINER_PATH.split(":"):
            if os.access(root + d + "/" + path, os.X_OK):
                path = d + "/" + path
                break
        else:
            raise FileNotFoundError(errno.ENOENT, "%s not found in %s's PATH" % (path, root))
    for _ in range(40):
        host = root + path
        if not os.path.islink(host):
            return host
        target = os.readlink(host)
        path = target if target.startswith("/") else os.path.normpath(
            os.path.join(os.path.dirname(path), target))
    raise OSError(errno.ELOOP, "too many symlinks: %s" % path)


class ContainerProcess:
    """One target in its own pid and mount namespaces, chrooted, in a
    runtime-named cgroup.  Use as a context manager, or call close()."""

    def __init__(self, root: Optional[str] = None, cgroup_style: str = "docker",
                 files: Optional[Mapping[str, Union[str, bytes]]] = None,
                 copy: Sequence[str] = ()) -> None:
        if cgroup_style not in CGROUP_STYLES:
            raise ValueError("unknown cgroup style %r (one of %s)"
                             % (cgroup_style, ", ".join(CGROUP_STYLES)))
        self.root = (root or debian_root()).rstrip("/")
        self.cgroup_style = cgroup_style
        self.container_id = secrets.token_hex(32)
        self.pod_uid = str(uuid.uuid4()) if cgroup_style in POD_STYLES else ""
        self.cgroup_mount, mount_root, self.cgroup_version = cgroup_hierarchy()
        #: The container's directory, relative to the hierarchy's mount point.
        self.cgroup_rel = CGROUP_STYLES[cgroup_style].format(
            id=self.container_id, pod=self.pod_uid.replace("-", "_"))
        self.cgroup_dir = os.path.join(self.cgroup_mount, self.cgroup_rel)
        #: The cgroup path as /proc/PID/cgroup names it.
        self.cgroup_path = os.path.normpath(os.path.join(mount_root, self.cgroup_rel))
        self._created_cgroups: List[str] = []
        self.popen: Optional[subprocess.Popen] = None
        self.host_pid = 0     # the target (the interpreter, not a wrapper)
        self.ns_pid = 0       # its pid inside the new pid namespace
        self.init_pid = 0     # host pid of the namespace's init
        self._stderr_file: Optional[tempfile._TemporaryFileWrapper] = None
        self._closed = False
        srv = os.path.join(self.root, "srv")
        os.makedirs(srv, exist_ok=True)
        self.host_workdir = tempfile.mkdtemp(prefix="perfagent-test.", dir=srv)
        os.chmod(self.host_workdir, 0o755)
        #: The per-test directory as the target sees it.
        self.workdir = self.host_workdir[len(self.root):]
        for name, data in (files or {}).items():
            self.add_file(name, data)
        for path in copy:
            self.copy_file(path)

    # -- files --------------------------------------------------------------

    def add_file(self, name: str, data: Union[str, bytes], mode: int = 0o644) -> str:
        """Write ``data`` to workdir/name; returns its path inside the root."""
        host = os.path.join(self.host_workdir, name)
        os.makedirs(os.path.dirname(host), exist_ok=True)
        with open(host, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(host, mode)
        return self.workdir + "/" + name

    def copy_file(self, path: str, name: str = "") -> str:
        """Copy a host file (mode kept) into workdir; returns its path inside the root."""
        name = name or os.path.basename(path)
        shutil.copy2(path, os.path.join(self.host_workdir, name))
        return self.workdir + "/" + name

    def host_path(self, path: str) -> str:
        """Where a path of the container is on the host (no symlinks followed)."""
        return self.root + path

    # -- cgroup -------------------------------------------------------------

    def _make_cgroup(self) -> None:
        path = self.cgroup_mount
        for part in self.cgroup_rel.split("/"):
            path = os.path.join(path, part)
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            self._created_cgroups.append(path)

    def _remove_cgroups(self) -> None:
        for path in reversed(self._created_cgroups):
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY: the dying tasks have not left yet; ENOTEMPTY:
                    # another test's container shares this parent.
                    if exc.errno == errno.ENOTEMPTY or path != self.cgroup_dir:
                        break
                    time.sleep(0.05)
        self._created_cgroups = []

    # -- start --------------------------------------------------------------

    def start(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None,
              init: bool = False, rootfs: str = "pivot") -> "ContainerProcess":
        """Start ``argv`` (resolved inside the root) and wait until the target runs.

        "{workdir}" in an argument is replaced by the per-test directory.
        ``stderr`` None: a temporary file, read by stderr_text().  ``env``
        is added to PATH, HOME, LANG.
        """
        if self.popen is not None:
            raise RuntimeError("already started")
        if rootfs not in ("pivot", "chroot"):
            raise ValueError("rootfs is 'pivot' or 'chroot', not %r" % (rootfs,))
        argv = [a.replace("{workdir}", self.workdir) for a in argv]
        exe = os.stat(_resolve_in_root(self.root, argv[0]))
        want = (exe.st_dev, exe.st_ino)
        full_env = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        full_env.update(env or {})
        if stderr is None:
            self._stderr_file = tempfile.TemporaryFile()
            stderr = self._stderr_file
        self._make_cgroup()
        procs = os.path.join(self.cgroup_dir, "cgroup.procs")
        prctl = ctypes.CDLL(None, use_errno=True).prctl

        def enter() -> None:
            # In the child, before any exec: into the cgroup ("0" is the
            # writer itself), and die with the test process.
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        cmd = ["unshare", "--pid", "--mount", "--fork", "--kill-child=SIGKILL",
               "--propagation", "private",
               "/bin/sh", "-c", _INNER, "sh", self.root, rootfs, "init" if init else "exec", *argv]
        self.popen = subprocess.Popen(cmd, env=full_env, stdin=stdin, stdout=stdout,
                                      stderr=stderr, preexec_fn=enter)
        try:
            self._wait_for_target(want, init)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_target(self, want: Tuple[int, int], init: bool) -> None:
        assert self.popen is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError("the container exited (status %s) before the target ran: %s"
                                   % (self.popen.returncode, self.stderr_text().strip()))
            kids = _children(self.popen.pid)
            if kids:
                self.init_pid = kids[0]
                for pid in ([self.init_pid] if not init else []) + _descendants(self.init_pid):
                    if _exe_id(pid) == want:
                        self.host_pid = pid
                        self.ns_pid = ns_pids_of(pid)[-1]
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the target did not start within %.0f s: %s"
                                   % (START_TIMEOUT, self.stderr_text().strip()))
            time.sleep(0.01)

    # -- I/O ----------------------------------------------------------------

    @property
    def stdout(self):
        return self.popen.stdout if self.popen else None

    @property
    def stdin(self):
        return self.popen.stdin if self.popen else None

    def readline(self) -> str:
        """One line of the target's stdout (started with stdout=PIPE)."""
        assert self.popen is not None and self.popen.stdout is not None
        return self.popen.stdout.readline().decode("utf-8", "replace")

    def stderr_text(self) -> str:
        if self._stderr_file is None:
            return ""
        self._stderr_file.seek(0)
        return self._stderr_file.read().decode("utf-8", "replace")

    def wait(self, timeout: Optional[float] = None) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    # -- end ----------------------------------------------------------------

    def close(self) -> None:
        """Kill everything in the container and remove what was made for it."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.popen is not None:
                try:
                    self._kill()
                finally:
                    for f in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                        if f is not None:
                            f.close()
        finally:
            try:
                self._remove_cgroups()
            finally:
                if self._stderr_file is not None:
                    self._stderr_file.close()
                shutil.rmtree(self.host_workdir, ignore_errors=True)

    def _kill(self) -> None:
        """SIGKILL the namespace's init (the kernel then kills every process
        in the namespace), and wait for unshare, which reaps it and exits.
        Before the init exists, or if unshare does not exit, unshare itself
        is killed (its --kill-child takes the init along)."""
        assert self.popen is not None
        if self.popen.poll() is not None:
            return
        if self.init_pid:
            try:
                os.kill(self.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        self.popen.kill()
        self.popen.wait(timeout=30)

    def __enter__(self) -> "ContainerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def run_in_container(argv: Sequence[str], root: Optional[str] = None,
                     cgroup_style: str = "docker", env: Optional[Mapping[str, str]] = None,
                     files: Optional[Mapping[str, Union[str, bytes]]] = None,
                     copy: Sequence[str] = (), stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=None, init: bool = False,
                     rootfs: str = "pivot") -> ContainerProcess:
    """Start ``argv`` in a container of the Debian root (see the module
    docstring); "{workdir}" in an argument names the per-test directory that
    holds ``files`` and ``copy``.  The caller closes it (``with``)."""
    proc = ContainerProcess(root, cgroup_style, files, copy)
    try:
        return proc.start(argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr, init=init,
                          rootfs=rootfs)
    except BaseException:
        proc.close()
        raise

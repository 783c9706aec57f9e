"""The Debian sid root and targets run in it as a container runtime would.

The root (tools/build_debian_root.sh) carries Debian's own python3.14 and
python3.15; tests/containers.py runs targets in it in their own pid and
mount namespaces and a runtime-named cgroup.  These tests check that
plumbing against what the agent's target package (perfagent.target) sees
of such a target from the host: namespace pids, container id and pod uid,
and the interpreter opened through the target's root by device and inode
-- never a different file that now sits at the same path.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap
import time

import pytest

import containers
from containers import CGROUP_STYLES, POD_STYLES, VERSIONS, debian_python, debian_root, run_in_container

from perfagent.elf.constants import ET_EXEC
from perfagent.elf.elffile import ELFFile
from perfagent.symbolize import procmaps
from perfagent.target import files, process

# Prints what the target itself knows (its pid in its namespace, version,
# executable), then waits to be killed.
SLEEPER = textwrap.dedent("""\
    import os, signal, sys
    print(os.getpid(), "%d.%d" % sys.version_info[:2], sys.hexversion, sys.executable, flush=True)
    signal.pause()
""")


def sleeper(c: containers.ContainerProcess):
    """(ns pid, version, hexversion, executable) the SLEEPER target printed."""
    line = c.readline().split()
    assert len(line) == 4, (line, c.stderr_text())
    return int(line[0]), line[1], int(line[2]), line[3]


def interpreter_mapping(pid: int, path: str):
    """The interpreter's first mapping (its ELF header) in /proc/PID/maps."""
    entries = [e for e in procmaps.read_maps(pid) if e.path == path]
    assert entries, "no mapping of %s in process %d" % (path, pid)
    return min(entries, key=lambda e: e.start)


# ---------------------------------------------------------------- the root --

@pytest.mark.parametrize("version", VERSIONS)
def test_root_interpreter_runs(version):
    root = debian_root()
    out = subprocess.run(["chroot", root, debian_python(version), "-c",
                          "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True)
    assert out.stdout.split() == [version, debian_python(version)]


@pytest.mark.parametrize("version", VERSIONS)
def test_root_has_internal_headers(version):
    """libpython3.X-dev: the internal headers the layout probes compile against."""
    root = debian_root()
    with open(os.path.join(root, containers.STAMP)) as f:
        installed = f.read().split()
    if "libpython%s-dev" % version not in installed:
        pytest.skip("sid had no libpython%s-dev when the root was built" % version)
    include = os.path.join(root, "usr/include/python" + version)
    for header in ("Python.h", "patchlevel.h", "internal/pycore_runtime.h",
                   "internal/pycore_interp.h", "internal/pycore_frame.h", "internal/pycore_code.h"):
        assert os.path.isfile(os.path.join(include, header)), header
    with open(os.path.join(include, "patchlevel.h")) as f:
        m = re.search(r'#define PY_VERSION\s+"(\d+\.\d+)', f.read())
    assert m is not None and m.group(1) == version


@pytest.mark.parametrize("version", VERSIONS)
def test_debian_interpreter_binary(version):
    """What the Python support must cope with in Debian's interpreters (see
    tools/build_debian_root.sh): the runtime linked into a stripped, non-PIE
    executable whose .dynsym still exports _PyRuntime and Py_Version; read
    with the agent's ELF reader and compared with readelf and with the
    interpreter's own sys.hexversion."""
    root = debian_root()
    path = os.path.join(root, debian_python(version).lstrip("/"))
    hexversion = int(subprocess.run(["chroot", root, debian_python(version), "-c",
                                     "import sys; print(sys.hexversion)"],
                                    stdout=subprocess.PIPE, text=True, check=True).stdout)
    readelf = subprocess.run(["readelf", "-W", "--dyn-syms", "-d", path], stdout=subprocess.PIPE,
                             text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf)
    assert needed and not any(n.startswith("libpython") for n in needed), needed
    readelf_syms = {}
    for line in readelf.splitlines():
        f = line.split()
        if len(f) == 8 and f[0][:-1].isdigit() and f[6] != "UND":
            readelf_syms[f[7].split("@")[0]] = (int(f[1], 16), int(f[2], 0))
    with ELFFile.from_path(path) as elf:
        assert elf.e_type == ET_EXEC
        names = {s.name for s in elf.sections}
        assert ".symtab" not in names and ".PyRuntime" in names and ".dynsym" in names
        assert not any(n.startswith(".debug_") for n in names)
        dyn = {s.name: s for s in elf.iter_symbols(".dynsym") if s.st_shndx}
        for name in ("_PyRuntime", "Py_Version", "_PyEval_EvalFrameDefault", "PyGILState_Ensure"):
            assert (dyn[name].st_value, dyn[name].st_size) == readelf_syms[name], name
        runtime = elf.section(".PyRuntime")
        assert dyn["_PyRuntime"].st_value == runtime.sh_addr
        py_version = dyn["Py_Version"]
        off = elf.vaddr_to_offset(py_version.st_value)
        assert off is not None and py_version.st_size == 8
        with open(path, "rb") as f:
            f.seek(off)
            (value,) = struct.unpack("<L", f.read(4))
    assert value == hexversion


class containers_sleeper:
    """``with containers_sleeper(version, **kw) as (c, printed):`` a SLEEPER target."""

    def __init__(self, version: str, **kw) -> None:
        self.version, self.kw = version, kw

    def __enter__(self):
        debian_root()
        self.c = run_in_container([debian_python(self.version), "{workdir}/sleeper.py"],
                                  files={"sleeper.py": SLEEPER}, **self.kw)
        try:
            return self.c, sleeper(self.c)
        except BaseException:
            self.c.close()
            raise

    def __exit__(self, *exc) -> None:
        self.c.close()


# --------------------------------------------------- what the agent sees --

@pytest.mark.parametrize("style", sorted(CGROUP_STYLES))
def test_view_of_container_target(style):
    version = VERSIONS[0]
    with containers_sleeper(version, cgroup_style=style) as (c, (ns_pid, got_version, _, exe)):
        assert (got_version, exe) == (version, debian_python(version))
        assert ns_pid == 1 == c.ns_pid   # exec'd by the namespace's init: pid 1
        assert c.host_pid == c.init_pid and c.host_pid != ns_pid
        view = process.view(c.host_pid)
        assert view is not None
        assert view.pid == c.host_pid
        assert view.ns_pids == containers.ns_pids_of(c.host_pid)
        assert view.ns_pids[0] == c.host_pid and view.ns_pid == ns_pid
        assert view.in_other_pid_namespace
        assert view.comm == "python" + version
        assert view.cgroup == c.cgroup_path
        assert len(c.container_id) == 64
        assert view.container.container_id == c.container_id
        assert view.container.pod_uid == c.pod_uid
        assert bool(c.pod_uid) == (style in POD_STYLES)
        assert not view.kernel_thread
        host_pid, start = c.host_pid, view.identity.start
        cgroup_dir, workdir = c.cgroup_dir, c.host_workdir
    # Everything the container had is gone (reaped, not a zombie).
    assert process.identity(host_pid) is None or process.identity(host_pid).start != start
    assert not os.path.exists(cgroup_dir)
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("version", VERSIONS)
def test_view_with_an_init(version):
    """docker --init: the target is a child of the namespace's init, not pid 1."""
    with containers_sleeper(version, init=True, cgroup_style="k8s") as (c, (ns_pid, _, _, _)):
        assert ns_pid > 1 and c.host_pid != c.init_pid
        assert containers.ns_pids_of(c.init_pid)[-1] == 1
        view = process.view(c.host_pid)
        assert view is not None and view.ns_pid == ns_pid == c.ns_pid
        assert view.ns_pids[0] == c.host_pid
        assert (view.container.container_id, view.container.pod_uid) == (c.container_id, c.pod_uid)


@pytest.mark.parametrize("rootfs", ["pivot", "chroot"])
@pytest.mark.parametrize("version", VERSIONS)
def test_open_as_seen_opens_the_interpreter(version, rootfs):
    """pivot_root (a runtime's rootfs): maps names /usr/bin/python3.X and the
    file is opened inside the target's root.  chroot: maps names the host
    path, which does not exist inside the root; map_files gives the file."""
    root = debian_root()
    on_disk = os.stat(os.path.join(root, debian_python(version).lstrip("/")))
    with containers_sleeper(version, rootfs=rootfs) as (c, _):
        path = debian_python(version) if rootfs == "pivot" else root + debian_python(version)
        m = interpreter_mapping(c.host_pid, path)
        assert (m.inode, os.major(on_disk.st_dev), os.minor(on_disk.st_dev)) == \
            (on_disk.st_ino, m.dev_major, m.dev_minor)
        seen, why = files.open_as_seen(c.host_pid, m.path, m.dev_major, m.dev_minor, m.inode,
                                       m.start, m.end, m.deleted)
        assert seen is not None, why
        try:
            assert (seen.st.st_dev, seen.st.st_ino) == (on_disk.st_dev, on_disk.st_ino)
            if rootfs == "pivot":
                assert seen.path == "/proc/%d/root%s" % (c.host_pid, path)
            else:
                assert seen.path == "/proc/%d/map_files/%x-%x" % (c.host_pid, m.start, m.end)
            assert not seen.mappable   # another mount namespace: read, never mmapped
            assert os.pread(seen.fd, 4, 0) == b"\x7fELF"
        finally:
            os.close(seen.fd)


def _check_refused(pid: int, m, new_inode: int, old_inode: int) -> None:
    """open_as_seen gives the mapped (old) file through map_files, or None
    without map_files; never the new file now at the path."""
    for deleted in sorted({m.deleted, False}):
        seen, why = files.open_as_seen(pid, m.path, m.dev_major, m.dev_minor, m.inode,
                                       m.start, m.end, deleted)
        assert seen is not None, why
        try:
            assert seen.st.st_ino == old_inode != new_inode
            assert seen.path == "/proc/%d/map_files/%x-%x" % (pid, m.start, m.end)
        finally:
            os.close(seen.fd)
        seen, why = files.open_as_seen(pid, m.path, m.dev_major, m.dev_minor, m.inode, deleted=deleted)
        assert seen is None
        if not deleted:
            assert why == "%s is no longer the mapped file (device/inode differ)" % m.path


@pytest.mark.parametrize("version", VERSIONS)
def test_open_as_seen_refuses_a_replaced_file(version):
    """An upgrade inside the container: a new file renamed over the
    interpreter the target runs (maps then says "(deleted)")."""
    root = debian_root()
    interp = os.path.join(root, debian_python(version).lstrip("/"))
    c = containers.ContainerProcess(root, copy=[interp])
    with c:
        exe = c.workdir + "/" + os.path.basename(interp)
        c.add_file("sleeper.py", SLEEPER)
        c.start([exe, "{workdir}/sleeper.py"])
        sleeper(c)
        old = interpreter_mapping(c.host_pid, exe)
        host = c.host_path(exe)
        assert os.stat(host).st_ino == old.inode
        with open(host + ".new", "wb") as f:
            f.write(b"\x7fELF not the interpreter\n")
        os.replace(host + ".new", host)
        new_inode = os.stat(host).st_ino
        m = interpreter_mapping(c.host_pid, exe)
        assert m.deleted and m.inode == old.inode
        _check_refused(c.host_pid, m, new_inode, old.inode)


@pytest.mark.parametrize("version", VERSIONS)
def test_open_as_seen_refuses_a_file_mounted_over(version):
    """A different file bind-mounted over the interpreter's path inside the
    container's mount namespace: maps still names the path (not deleted),
    the path inside the root now opens another inode, and the host's view
    of the same path is still the old file."""
    root = debian_root()
    interp = os.path.join(root, debian_python(version).lstrip("/"))
    with containers.ContainerProcess(root, copy=[interp]) as c:
        exe = c.workdir + "/" + os.path.basename(interp)
        c.add_file("sleeper.py", SLEEPER)
        other = c.add_file("other", b"\x7fELF not the interpreter\n", 0o755)
        c.start([exe, "{workdir}/sleeper.py"])
        sleeper(c)
        old = interpreter_mapping(c.host_pid, exe)
        subprocess.run(["nsenter", "--target", str(c.host_pid), "--mount", "--root",
                        "mount", "--bind", other, exe], check=True)
        new_inode = os.stat(c.host_path(other)).st_ino
        assert os.stat(c.host_path(exe)).st_ino == old.inode   # not on the host
        m = interpreter_mapping(c.host_pid, exe)
        assert not m.deleted and m.inode == old.inode
        _check_refused(c.host_pid, m, new_inode, old.inode)


# ------------------------------------------------------------- clean-up --

def test_cleanup_when_the_test_fails():
    with pytest.raises(ZeroDivisionError):
        with containers_sleeper(VERSIONS[0], cgroup_style="k8s") as (c, _):
            host_pid, init_pid = c.host_pid, c.init_pid
            start = process.identity(host_pid)
            created = list(c._created_cgroups)
            assert c.cgroup_dir in created
            1 / 0
    assert process.identity(host_pid) is None or process.identity(host_pid) != start
    assert process.identity(init_pid) is None or process.identity(init_pid) != start
    assert [path for path in created if os.path.exists(path)] == []
    assert not os.path.exists(c.host_workdir)
    with open("/proc/self/mountinfo") as f:
        assert c.root not in f.read()


def test_container_dies_with_the_test_process():
    """A test process killed before close(): PR_SET_PDEATHSIG kills unshare,
    whose --kill-child takes the namespace's init and so every process in it."""
    debian_root()
    code = textwrap.dedent("""\
        import os, sys
        sys.path.insert(0, %r)
        import containers
        c = containers.run_in_container([containers.debian_python(%r), "-c", "import signal; signal.pause()"])
        print(c.host_pid, c.init_pid, c.cgroup_dir, c.host_workdir, " ".join(c._created_cgroups), flush=True)
        os._exit(0)
    """) % (os.path.dirname(os.path.abspath(__file__)), VERSIONS[0])
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         check=True, timeout=60).stdout.split()
    host_pid, init_pid, cgroup_dir, workdir, created = int(out[0]), int(out[1]), out[2], out[3], out[4:]
    try:
        # The kill is asynchronous: wait (bounded) for the target to go.
        deadline = time.monotonic() + 10
        while os.path.exists("/proc/%d" % host_pid) and time.monotonic() < deadline:
            with open("/proc/%d/stat" % host_pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        with open(os.path.join(cgroup_dir, "cgroup.procs")) as f:
            assert f.read() == ""
    finally:
        for path in reversed(created):
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    time.sleep(0.05)
        subprocess.run(["rm", "-rf", "--one-file-system", workdir], check=True)


def test_view_of_kernel_threads_from_stat_alone():
    """A kernel thread's view comes from /proc/PID/stat alone (one read, not
    five): the same name, uid, pid and (root) cgroup the other files give."""
    from perfagent.target import procfs
    from perfagent.target.container import parse_cgroup
    kthreads = [pid for pid in procfs.pids() if procfs.kernel_thread(pid)][:20]
    if not kthreads:
        pytest.skip("no kernel threads visible")
    for pid in kthreads:
        v = process.view(pid)
        if v is None:
            continue   # gone meanwhile
        fields = procfs.status(pid)
        assert v.kernel_thread and v.comm == procfs.comm(pid)
        assert v.uid == procfs.real_uid(fields) == 0
        assert v.ns_pids == procfs.ns_pids(fields) == (pid,)
        assert v.container == parse_cgroup(procfs.cgroup_path(pid))

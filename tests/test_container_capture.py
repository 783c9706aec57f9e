"""Captures of targets in containers (own pid and mount namespaces, runtime-named cgroups).

The Debian sid root of tools/build_debian_root.sh provides Debian's own
python3.14 and python3.15 (stripped, static libpython, non-PIE); tests/
containers.py runs them the way a container runtime would.  What must hold:

* every sample carries ``container_id`` (and ``pod_uid`` in a Kubernetes
  layout) and ``ns_pid`` (the pid inside the namespace);
* a perf map written by the interpreter (``-X perf``) inside the container,
  as ``/tmp/perf-<namespace pid>.map`` in the container's own /tmp, names
  Python functions: the agent looks for it under the namespace pid through
  the process's root, not under the host pid in the host's /tmp.
"""

from __future__ import annotations

import os
import re

import pytest

import containers
from conftest import PROGRAMS, run_agent, sample_stacks
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PY_RATIO = os.path.join(PROGRAMS, "py_ratio.py")


def _capture(tmp_path, pid: int, *extra: str):
    out = str(tmp_path / "c.pb.gz")
    r = run_agent(["--profile", "--pid", str(pid), "--duration", "3s", "--quiet",
                   "--profile-output", out, *extra], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return sample_stacks(read_profile(out)), r.stderr


@pytest.mark.parametrize("version", containers.VERSIONS)
def test_container_labels_and_perf_map_under_namespace_pid(tmp_path, version):
    python = containers.debian_python(version)
    with containers.run_in_container([python, "-X", "perf", "{workdir}/py_ratio.py", "30"],
                                     copy=[PY_RATIO], cgroup_style="docker") as c:
        assert c.readline().startswith("ready")
        assert c.ns_pid == 1 and c.host_pid != 1
        stacks, stderr = _capture(tmp_path, c.host_pid)
        # The map is in the container's /tmp under its own pid, never in ours.
        assert not os.path.exists("/tmp/perf-%d.map" % c.host_pid)
        assert os.path.exists(c.host_path("/tmp/perf-%d.map" % c.ns_pid)) or \
            os.path.exists("/proc/%d/root/tmp/perf-%d.map" % (c.host_pid, c.ns_pid))
    total = sum(v[0] for _, _, v in stacks)
    assert total >= 100, stderr
    for names, labels, _ in stacks:
        assert labels["container_id"] == c.container_id
        assert labels["ns_pid"] == c.ns_pid
        assert labels["pid"] == c.host_pid
        assert "pod_uid" not in labels
    named = sum(v[0] for names, _, v in stacks if {"fn1", "fn2", "fn3"} & set(names))
    assert named / total >= 0.9, (named, total, stderr)


def test_kubernetes_pod_uid_label(tmp_path):
    python = containers.debian_python("3.14")
    with containers.run_in_container([python, "{workdir}/py_ratio.py", "30"], copy=[PY_RATIO],
                                     cgroup_style="k8s", init=True) as c:
        assert c.readline().startswith("ready")
        stacks, stderr = _capture(tmp_path, c.host_pid)
    assert stacks, stderr
    for _, labels, _ in stacks:
        assert labels["container_id"] == c.container_id
        assert labels["pod_uid"] == c.pod_uid
        assert labels["ns_pid"] == c.ns_pid and c.ns_pid != 1


def test_host_process_has_no_container_labels(tmp_path, chain_bin):
    import subprocess
    proc = subprocess.Popen([chain_bin, "20"], stdout=subprocess.PIPE)
    try:
        stacks, stderr = _capture(tmp_path, proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert stacks, stderr
    for _, labels, _ in stacks:
        assert "container_id" not in labels and "ns_pid" not in labels and "pod_uid" not in labels


def test_go_pprof_selects_exactly_one_process_by_each_label(tmp_path, chain_bin):
    """Go's pprof on a -a profile of a host process and a container: -tagfocus
    with each label selects exactly the samples of that process (pid, tid and
    ns_pid numeric labels, as pprof's own producers write numbers; comm,
    process, container_id strings)."""
    import subprocess
    from pprof_check import _run_go, require_go
    require_go()
    python = containers.debian_python("3.14")
    host = subprocess.Popen([chain_bin, "20"], stdout=subprocess.PIPE)
    try:
        with containers.run_in_container([python, "{workdir}/py_ratio.py", "30"], copy=[PY_RATIO],
                                         cgroup_style="k8s", init=True) as c:
            assert c.readline().startswith("ready")
            out = str(tmp_path / "all.pb.gz")
            r = run_agent(["--profile", "-a", "--duration", "3s", "--quiet", "--profile-output", out],
                          cwd=str(tmp_path))
            assert r.returncode == 0, r.stderr
    finally:
        host.kill()
        host.wait()
    stacks = sample_stacks(read_profile(out))

    def go_total(focus: str) -> int:
        res = _run_go(["tool", "pprof", "-raw", "-tagfocus=" + focus, out])
        assert res.returncode == 0, res.stderr
        # -raw: "Samples:" then one line per sample starting with its values
        values = re.findall(r"^\s+(\d+)\s+\d+:", res.stdout, re.M)
        return sum(int(v) for v in values)

    for focus, keep in (
            ("pid=%d" % host.pid, lambda l: l["pid"] == host.pid),
            ("tid=%d" % host.pid, lambda l: l["tid"] == host.pid),
            ("pid=%d" % c.host_pid, lambda l: l["pid"] == c.host_pid),
            ("ns_pid=%d" % c.ns_pid, lambda l: l.get("ns_pid") == c.ns_pid),
            ("container_id=%s" % c.container_id, lambda l: l.get("container_id") == c.container_id),
            ("pod_uid=%s" % c.pod_uid, lambda l: l.get("pod_uid") == c.pod_uid),
            ("process=chain", lambda l: l["process"] == "chain")):
        want = sum(v[0] for _, labels, v in stacks if keep(labels))
        assert want > 0, focus
        assert go_total(focus) == want, (focus, want)

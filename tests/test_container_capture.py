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
        assert labels["ns_pid"] == str(c.ns_pid)
        assert labels["pid"] == str(c.host_pid)
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
        assert labels["ns_pid"] == str(c.ns_pid) and c.ns_pid != 1


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

"""Which container (and Kubernetes pod) a cgroup path belongs to.

Container runtimes name the cgroup of each container after its 64-hex id;
the layouts differ by runtime and cgroup driver:

=====================  ===========================================================
docker (systemd)       /system.slice/docker-<id>.scope
docker (cgroupfs)      /docker/<id>
containerd / k8s       /kubepods.slice/kubepods-besteffort.slice/
                       kubepods-besteffort-pod<uid_with_underscores>.slice/
                       cri-containerd-<id>.scope
k8s (cgroupfs)         /kubepods/burstable/pod<uid>/<id>
cri-o                  .../crio-<id>.scope  (crio-conmon-<id>.scope is its monitor)
podman                 /machine.slice/libpod-<id>.scope[/container]
=====================  ===========================================================

The innermost match wins (nested containers).  The path is what the
process's /proc/PID/cgroup says, read from the host: inside a cgroup
namespace a process cannot forge its host-side path.
"""

from __future__ import annotations

import re

from perfagent.records import NamedTuple

_ID = r"([0-9a-f]{64})"
_SCOPED = re.compile(r"^(?:docker|cri-containerd|crio|libpod|containerd|cri-o)-%s\.scope$" % _ID)
_BARE = re.compile(r"^%s$" % _ID)
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")


class ContainerInfo(NamedTuple):
    container_id: str = ""
    pod_uid: str = ""


def parse_cgroup(path: str) -> ContainerInfo:
    """The container id and pod uid a cgroup path names ("" when none)."""
    container_id = ""
    pod_uid = ""
    for part in path.split("/"):
        m = _SCOPED.match(part) or _BARE.match(part)
        if m:
            container_id = m.group(1)
            continue
        m = _POD.search(part)
        if m:
            pod_uid = m.group(1).replace("_", "-")
    return ContainerInfo(container_id, pod_uid)

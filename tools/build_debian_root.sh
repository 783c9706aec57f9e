#!/usr/bin/env bash
# Builds a minimal Debian sid root with Debian's own CPython interpreters,
# for the tests that run targets "in a container" (tests/containers.py:
# unshare --pid --mount --fork + chroot, in a container runtime's cgroup):
#
#   debootstrap --variant=minbase --include=python3.14,python3.15,
#               libpython3.14-dev,libpython3.15-dev sid ROOT MIRROR
#
# into ${PERFAGENT_DEBIAN_ROOT:-/var/cache/perfagent/debian-sid}, outside the
# repository, once per machine.  When the root is there and its interpreters
# run (chroot ROOT python3.X), nothing is done.  Stdout gets the paths:
#
#   root /var/cache/perfagent/debian-sid
#   python3.14 /var/cache/perfagent/debian-sid/usr/bin/python3.14
#   include3.14 /var/cache/perfagent/debian-sid/usr/include/python3.14
#   ...
#
# (the interpreter paths as the host sees them; inside the root they are
# /usr/bin/python3.X).  Progress goes to stderr, the full log to
# ROOT.log beside the root; ROOT.lock serialises concurrent runs.  The
# root is built in ROOT.tmp.XXXXXX and renamed when complete, so a
# half-built root is never used.
#
# libpython3.X-dev is the package that carries /usr/include/python3.X with
# the internal/*.h headers (pycore_*.h), for offsetof probes compiled on the
# host against the root's headers; it also brings Debian's shared
# libpython3.X.so.1.0 and the static libpython3.X.a.  No compiler is put in
# the root (libc6-dev comes along as a dependency of the -dev packages).
#
# What Debian's interpreters are (sid, 3.14.10-1 and 3.15.2-1 when this was
# written, GCC 16.2; readelf -h -d -S -l --dyn-syms on ROOT/usr/bin/python3.X):
#   * the runtime is linked into the executable: DT_NEEDED is only libc, libm,
#     libz, libexpat (3.15 also libzstd, libgcc_s); Debian's shared
#     libpython3.X.so.1.0 (from libpython3.X) is not used by it;
#   * non-PIE (ET_EXEC, first PT_LOAD at 0x400000);
#   * stripped: no .symtab, no .debug_*; a .gnu_debuglink and a GNU build id
#     (the debug info is in the python3.X-dbg packages, not installed);
#   * a .dynsym of ~2400 (3.14) / ~2700 (3.15) entries exporting the C API
#     for extension modules: _PyRuntime (OBJECT, alone in the .PyRuntime
#     section, which starts with _Py_DebugOffsets), Py_Version,
#     _PyEval_EvalFrameDefault, PyGILState_Ensure, _PyThreadState_GetCurrent;
#     the thread-local _Py_tss_tstate is not exported (a PT_TLS segment
#     exists); 3.15 also has an .AsyncioDebug section;
#   * frame pointers: 3.14 is built with plain -O2 (no frame pointers, except
#     _PyEval_EvalFrameDefault's own %rbp frame); 3.15 with
#     -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer (its sysconfig
#     CFLAGS; shrink-wrapped functions set %rbp up after an early exit path);
#   * both configured --enable-shared --enable-experimental-jit=yes-off
#     --with-dtrace (.probes / .note.stapsdt sections).
#
# The Debian mirror is read from the machine's apt configuration
# (tools/debian_mirror.sh, shared with build_test_pythons.sh).
#
# Environment:
#   PERFAGENT_DEBIAN_ROOT      where the root goes (default above)
#   PERFAGENT_DEBIAN_MIRROR    mirror URI to use instead of the apt config's
#   PERFAGENT_DEBIAN_SUITE     suite (default sid)
#   PERFAGENT_DEBIAN_PYTHONS   interpreter versions (default "3.14 3.15")
set -euo pipefail

TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${PERFAGENT_DEBIAN_ROOT:-/var/cache/perfagent/debian-sid}
ROOT=${ROOT%/}
SUITE=${PERFAGENT_DEBIAN_SUITE:-sid}
VERSIONS=(${PERFAGENT_DEBIAN_PYTHONS:-3.14 3.15})
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
LOG="$ROOT.log"
STAMP=.perfagent-root   # in the root: written last, lists what was asked for

say() { echo "build_debian_root: $*" >&2; [ ! -d "$(dirname "$ROOT")" ] || echo "=== $(date '+%F %T') $*" >>"$LOG" 2>/dev/null || true; }
die() { say "ERROR: $*"; [ ! -f "$LOG" ] || echo "build_debian_root: see $LOG" >&2; exit 1; }

# The root counts as built when the stamp is there and each interpreter runs
# inside it as the version it claims.
works() {
    local v
    [ -f "$ROOT/$STAMP" ] || return 1
    for v in "${VERSIONS[@]}"; do
        chroot "$ROOT" "/usr/bin/python$v" -c \
            "import sys; assert sys.version_info[:2] == tuple(map(int, '$v'.split('.')))" \
            >/dev/null 2>&1 || return 1
    done
}

report() {
    local v
    echo "root $ROOT"
    for v in "${VERSIONS[@]}"; do
        echo "python$v $ROOT/usr/bin/python$v"
        [ ! -d "$ROOT/usr/include/python$v/internal" ] || echo "include$v $ROOT/usr/include/python$v"
    done
}

if [ "$(id -u)" != 0 ]; then
    # chroot needs root even to check.
    command -v sudo >/dev/null 2>&1 || die "must run as root (debootstrap, chroot, $ROOT)"
    exec sudo -E "$0" "$@"
fi

if works; then report; exit 0; fi

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
if ! flock -n 9; then
    say "another build is running; waiting for it"
    flock 9
fi
# The other run may have built it meanwhile.
if works; then report; exit 0; fi

: >"$LOG"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
T0=$(date +%s)

# Unmount whatever a killed debootstrap left mounted under $1 (its /proc,
# /sys), deepest first, then remove the tree without crossing filesystems.
remove_tree() {
    local dir=$1 m
    [ -e "$dir" ] || return 0
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r | while read -r m; do umount -l "$m" 2>>"$LOG" || true; done
    rm -rf --one-file-system "$dir"
}

# Left-overs of an interrupted run (we hold the lock: nobody else builds).
for old in "$ROOT".tmp.*; do
    [ -d "$old" ] || continue
    say "removing the half-built $old"
    remove_tree "$old"
done

# ------------------------------------------------------------- tools --
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    apt-get update -q >>"$LOG" 2>&1 || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends debootstrap >>"$LOG" 2>&1 || die "cannot install debootstrap"
fi
[ -f /usr/share/debootstrap/scripts/"$SUITE" ] || die "this debootstrap has no script for $SUITE"

# ------------------------------------------------------------ mirror --
# shellcheck source=tools/debian_mirror.sh
. "$TOOLS/debian_mirror.sh"
mapfile -t MIRRORS < <(debian_mirrors)
[ ${#MIRRORS[@]} -gt 0 ] || die "no Debian mirror found in /etc/apt/sources.list{,.d/*.list,.d/*.sources} (set PERFAGENT_DEBIAN_MIRROR)"

WORK=$(mktemp -d "$ROOT.tmp.XXXXXX")
APTDIR="$WORK.apt"   # the private apt state of the package check, beside the root
trap 'remove_tree "$WORK"; rm -rf "$APTDIR"' EXIT

# Which of the wanted packages $SUITE has, through a private apt setup (the
# machine's own sources and lists are left as they are).  Prints them.
available() {
    local mirror=$1 signed=$2 p opts
    rm -rf "$APTDIR"
    mkdir -p "$APTDIR/sources.list.d" "$APTDIR/lists/partial" "$APTDIR/archives/partial"
    : >"$APTDIR/sources.list"
    {
        echo "Types: deb"
        echo "URIs: $mirror"
        echo "Suites: $SUITE"
        echo "Components: main"
        if [ "$signed" = yes ]; then echo "Signed-By: $KEYRING"; else echo "Trusted: yes"; fi
    } >"$APTDIR/sources.list.d/root.sources"
    opts=(-o "Dir::Etc::SourceList=$APTDIR/sources.list"
          -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
          -o "Dir::State::Lists=$APTDIR/lists"
          -o "Dir::State::status=/dev/null"
          -o "Dir::Cache::Archives=$APTDIR/archives"
          -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
          -o "Acquire::Languages=none" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" update >>"$LOG" 2>&1 || return 1
    for p in "${WANTED[@]}"; do
        if apt-cache "${opts[@]}" show "$p" >>"$LOG" 2>&1; then echo "$p"; fi
    done
    apt-cache "${opts[@]}" policy "${WANTED[@]}" >>"$LOG" 2>&1 || true
}

REQUIRED=()
OPTIONAL=()
for v in "${VERSIONS[@]}"; do
    REQUIRED+=("python$v")
    OPTIONAL+=("libpython$v-dev")
done
WANTED=("${REQUIRED[@]}" "${OPTIONAL[@]}")

built=no
for mirror in "${MIRRORS[@]}"; do
    for signed in yes no; do
        [ "$signed" = no ] || [ -f "$KEYRING" ] || continue
        say "checking $SUITE on $mirror ($( [ "$signed" = yes ] && echo "signed-by $KEYRING" || echo "unsigned" ))"
        if ! have=$(available "$mirror" "$signed"); then
            say "apt-get update failed for $mirror $SUITE"
            continue
        fi
        include=()
        for p in "${REQUIRED[@]}"; do
            grep -qx "$p" <<<"$have" || die "$SUITE on $mirror has no $p (set PERFAGENT_DEBIAN_PYTHONS)"
            include+=("$p")
        done
        for p in "${OPTIONAL[@]}"; do
            if grep -qx "$p" <<<"$have"; then include+=("$p"); else say "warning: $SUITE has no $p; no headers for it"; fi
        done
        gpg=(--keyring="$KEYRING")
        [ "$signed" = yes ] || gpg=(--no-check-gpg)
        say "debootstrap --variant=minbase --include=$(IFS=,; echo "${include[*]}") $SUITE $mirror (a few minutes)"
        remove_tree "$WORK"; mkdir -p "$WORK"
        if debootstrap --variant=minbase "${gpg[@]}" --include="$(IFS=,; echo "${include[*]}")" \
                "$SUITE" "$WORK" "$mirror" >>"$LOG" 2>&1; then
            built=yes
            break 2
        fi
        say "debootstrap failed from $mirror ($(grep -E '^(E|W):' "$LOG" | tail -n1))"
        [ "$signed" = yes ] || break
    done
done
[ "$built" = yes ] || die "could not debootstrap $SUITE"

# The downloaded .debs are not needed any more.
rm -f "$WORK"/var/cache/apt/archives/*.deb
rm -rf "$WORK"/var/lib/apt/lists/* "$WORK"/debootstrap

# Check before publishing: each interpreter runs inside the new root.
for v in "${VERSIONS[@]}"; do
    out=$(chroot "$WORK" "/usr/bin/python$v" -c 'import sys, threading, subprocess, ctypes; print(sys.version.split()[0])' 2>>"$LOG") \
        || die "python$v does not run in the new root"
    say "python$v $out"
    { readelf -d -S -W "$WORK/usr/bin/python$v"
      readelf --dyn-syms -W "$WORK/usr/bin/python$v" | grep -wE '_PyRuntime|Py_Version|_Py_DebugOffsets' || true
    } >>"$LOG" 2>&1 || true
done
printf '%s\n' "${include[@]}" >"$WORK/$STAMP"

if [ -e "$ROOT" ]; then
    say "replacing the old root $ROOT"
    remove_tree "$ROOT"
fi
mv "$WORK" "$ROOT"
trap 'rm -rf "$APTDIR"' EXIT
say "done in $(( $(date +%s) - T0 ))s: $ROOT ($(du -sh --one-file-system "$ROOT" | cut -f1))"
report

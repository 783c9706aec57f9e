#!/usr/bin/env bash
# Builds the CPython 3.13 interpreters that the Python-support tests run:
#
#   shared  --enable-shared: bin/python3.13 links lib/libpython3.13.so.1.0
#   static  --disable-shared: bin/python3.13 carries the whole runtime
#
# both from Debian's python3.13 source package (`apt-get source`), both with
# the perf trampoline (sys.activate_stack_trampoline) and both WITHOUT frame
# pointers (plain -O2, no -fno-omit-frame-pointer), no PGO, no LTO, no tests.
#
# They go to ${PERFAGENT_PYTHON_CACHE:-/var/cache/perfagent/pythons}/3.13-shared
# and .../3.13-static, outside the repository.  When both already exist and
# run, nothing is built.  Stdout gets one line per interpreter:
#
#   shared /var/cache/perfagent/pythons/3.13-shared/bin/python3.13
#   static /var/cache/perfagent/pythons/3.13-static/bin/python3.13
#
# Progress goes to stderr, the full build output to $CACHE/build.log.
#
# The Debian mirror is read from the machine's apt configuration (one-line
# sources.list entries and deb822 .sources files); bookworm carries no
# python3.13, so a deb-src entry for trixie (then sid) on that mirror is set up
# in a private apt configuration under a temporary directory: the machine's
# sources and package lists are left as they are.
#
# Environment:
#   PERFAGENT_PYTHON_CACHE          cache directory (default above)
#   PERFAGENT_DEBIAN_MIRROR         mirror URI to use instead of the apt config's
#   PERFAGENT_PYTHON_SUITES         suites to try, in order (default "trixie sid")
#   PERFAGENT_PYTHON_DEBIAN_PATCHES 1: apply Debian's patches (default: the
#                                   package's upstream source, patches skipped)
#   PERFAGENT_PYTHON_JOBS           make -j (default: number of CPUs)
set -euo pipefail

CACHE=${PERFAGENT_PYTHON_CACHE:-/var/cache/perfagent/pythons}
KINDS=(shared static)
SUITES=(${PERFAGENT_PYTHON_SUITES:-trixie sid})
JOBS=${PERFAGENT_PYTHON_JOBS:-$(nproc 2>/dev/null || echo 2)}
LOG="$CACHE/build.log"

say() { echo "build_test_pythons: $*" >&2; [ ! -d "$CACHE" ] || echo "=== $(date '+%F %T') $*" >>"$LOG"; }
die() { say "ERROR: $*"; [ ! -f "$LOG" ] || echo "build_test_pythons: see $LOG" >&2; exit 1; }

interp() { echo "$CACHE/3.13-$1/bin/python3.13"; }

# An interpreter counts as built when it runs and is 3.13 with the trampoline.
works() {
    local py
    py=$(interp "$1")
    [ -x "$py" ] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 13); sys.activate_stack_trampoline' >/dev/null 2>&1
}

report() {
    local k
    for k in "${KINDS[@]}"; do echo "$k $(interp "$k")"; done
}

todo=()
for k in "${KINDS[@]}"; do works "$k" || todo+=("$k"); done
if [ ${#todo[@]} -eq 0 ]; then
    report
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root (apt-get, $CACHE)"
    exec sudo -E "$0" "$@"
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build is running; waiting for it"
    flock 9
fi
# The other run may have built them meanwhile.
todo=()
for k in "${KINDS[@]}"; do works "$k" || todo+=("$k"); done
if [ ${#todo[@]} -eq 0 ]; then report; exit 0; fi

: >"$LOG"
say "building: ${todo[*]} (log: $LOG)"
T0=$(date +%s)

WORK=$(mktemp -d "$CACHE/work.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# A clean, predictable environment for the build: no pyenv shims, no flags
# from the caller that could bring frame pointers or LTO back.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
unset CFLAGS CPPFLAGS CXXFLAGS LDFLAGS OPT PYTHONPATH PYTHONHOME CONFIG_SITE
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------- tools --
need_pkgs=()
have_pkg() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
for p in build-essential dpkg-dev pkg-config binutils xz-utils \
         libffi-dev zlib1g-dev libssl-dev libbz2-dev liblzma-dev \
         libsqlite3-dev libreadline-dev libncurses-dev libexpat1-dev \
         uuid-dev libgdbm-dev; do
    have_pkg "$p" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "installing ${need_pkgs[*]}"
    apt-get update -q >>"$LOG" 2>&1 || die "apt-get update failed"
    # Required ones first, then the nice-to-have -dev packages one by one.
    for p in build-essential dpkg-dev binutils xz-utils; do
        case " ${need_pkgs[*]} " in *" $p "*)
            apt-get install -y -q --no-install-recommends "$p" >>"$LOG" 2>&1 || die "cannot install $p";;
        esac
    done
    for p in "${need_pkgs[@]}"; do
        have_pkg "$p" && continue
        apt-get install -y -q --no-install-recommends "$p" >>"$LOG" 2>&1 \
            || say "warning: cannot install $p (the modules that need it will be missing)"
    done
fi

# ----------------------------------------------------------- the mirror --
# apt_entries, debian_mirrors: the Debian mirror from the machine's apt config.
# shellcheck source=tools/debian_mirror.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian_mirror.sh"

# ------------------------------------------------------------ the source --
SRCDIR="$CACHE/src"           # downloaded .dsc / .orig / .debian tarballs, kept
mkdir -p "$SRCDIR"

fetch_source() {
    local mirror suite keyring signed aptdir opts
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    mapfile -t mirrors < <(debian_mirrors)
    [ ${#mirrors[@]} -gt 0 ] || die "no Debian mirror found in /etc/apt/sources.list{,.d/*.list,.d/*.sources} (set PERFAGENT_DEBIAN_MIRROR)"
    for mirror in "${mirrors[@]}"; do
        for suite in "${SUITES[@]}"; do
            for signed in yes no; do
                [ "$signed" = no ] || [ -f "$keyring" ] || continue
                aptdir="$WORK/apt-$suite-$signed"
                mkdir -p "$aptdir/sources.list.d" "$aptdir/lists/partial" "$aptdir/archives/partial"
                : >"$aptdir/sources.list"
                {
                    echo "Types: deb-src"
                    echo "URIs: $mirror"
                    echo "Suites: $suite"
                    echo "Components: main"
                    if [ "$signed" = yes ]; then echo "Signed-By: $keyring"; else echo "Trusted: yes"; fi
                } >"$aptdir/sources.list.d/python313-src.sources"
                opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list"
                      -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
                      -o "Dir::State::Lists=$aptdir/lists"
                      -o "Dir::Cache::Archives=$aptdir/archives"
                      -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
                      -o "Acquire::Languages=none"
                      -o "APT::Sandbox::User=root")
                say "apt: deb-src $mirror $suite ($( [ "$signed" = yes ] && echo "signed-by $keyring" || echo "trusted" ))"
                if ! apt-get "${opts[@]}" update >>"$LOG" 2>&1; then
                    say "apt-get update failed for $mirror $suite"
                    continue
                fi
                ls "$aptdir/lists/"*Sources* >/dev/null 2>&1 || { say "no Sources index from $mirror $suite"; continue; }
                rm -f "$SRCDIR"/*
                if (cd "$SRCDIR" && apt-get "${opts[@]}" source --download-only python3.13) >>"$LOG" 2>&1; then
                    say "fetched $(cd "$SRCDIR" && ls ./*.dsc | sed 's,^\./,,') from $mirror $suite"
                    return 0
                fi
                say "apt-get source python3.13 failed for $mirror $suite"
                break   # a signing problem would have failed update; try the next suite
            done
        done
    done
    return 1
}

if ls "$SRCDIR"/python3.13_*.dsc >/dev/null 2>&1; then
    say "using cached source $(cd "$SRCDIR" && ls python3.13_*.dsc)"
else
    fetch_source || die "could not fetch the python3.13 source package (suites: ${SUITES[*]})"
fi

DSC=$(ls "$SRCDIR"/python3.13_*.dsc | head -n1)
SRC="$WORK/python3.13"
if [ "${PERFAGENT_PYTHON_DEBIAN_PATCHES:-0}" = 1 ]; then
    say "unpacking $(basename "$DSC") with Debian's patches"
    dpkg-source -x "$DSC" "$SRC" >>"$LOG" 2>&1 || die "dpkg-source -x failed"
else
    say "unpacking $(basename "$DSC") (upstream source, Debian patches skipped)"
    dpkg-source --skip-patches -x "$DSC" "$SRC" >>"$LOG" 2>&1 || die "dpkg-source -x failed"
fi
[ -x "$SRC/configure" ] || die "no configure in the unpacked source"
VERSION=$(sed -n 's/^#define PY_VERSION[[:space:]]*"\(.*\)".*/\1/p' "$SRC/Include/patchlevel.h")
case "$VERSION" in 3.13.*) ;; *) die "source is Python '$VERSION', not 3.13";; esac
say "CPython $VERSION"

# ------------------------------------------------------------ the builds --
# First instructions of _PyEval_EvalFrameDefault in $1: fails when they are
# the frame-pointer prologue push %rbp; mov %rsp,%rbp.
check_no_frame_pointer() {
    local insns
    insns=$(objdump -d --no-show-raw-insn --disassemble=_PyEval_EvalFrameDefault "$1" 2>/dev/null \
            | awk '/^[[:space:]]+[0-9a-f]+:/ { sub(/^[^:]*:[[:space:]]*/, ""); if ($1 != "endbr64" && n++ < 2) print }' || true)
    [ -n "$insns" ] || { say "no _PyEval_EvalFrameDefault in $1"; return 1; }
    insns=$(printf '%s\n' "$insns" | tr -s ' \t' ' ' | paste -sd';')
    if [[ "$insns" == "push %rbp;mov %rsp,%rbp"* ]]; then
        say "_PyEval_EvalFrameDefault in $1 has a frame-pointer prologue"
        return 1
    fi
}

build_one() {
    local kind=$1 prefix="$CACHE/3.13-$1" bdir="$WORK/build-$1" stage="$WORK/stage-$1" t0 py
    # No --enable-optimizations (PGO), no LTO; the perf trampoline is on by
    # default on x86-64/aarch64 Linux (checked after the install).  OPT is
    # configure's optimization setting: -O2 like Debian's, no frame pointers
    # (configure adds -DNDEBUG itself).
    local conf=(--prefix="$prefix" --without-ensurepip --disable-test-modules
                --with-lto=no --with-computed-gotos OPT="-g -O2 -Wall")
    case $kind in
        shared) conf+=(--enable-shared LDFLAGS="-Wl,-rpath,$prefix/lib");;
        static) conf+=(--disable-shared);;
    esac
    t0=$(date +%s)
    rm -rf "$bdir" "$stage"; mkdir -p "$bdir"
    say "[$kind] configure ${conf[*]}"
    (cd "$bdir" && "$SRC/configure" "${conf[@]}") >>"$LOG" 2>&1 || die "[$kind] configure failed"
    say "[$kind] make -j$JOBS"
    make -C "$bdir" -j"$JOBS" >>"$LOG" 2>&1 || die "[$kind] make failed"
    say "[$kind] make install"
    make -C "$bdir" install DESTDIR="$stage" >>"$LOG" 2>&1 || die "[$kind] make install failed"
    rm -rf "$prefix"
    mkdir -p "$(dirname "$prefix")"
    mv "$stage$prefix" "$prefix"
    py="$prefix/bin/python3.13"
    "$py" -c 'import sys, threading, subprocess, signal, select, time; sys.activate_stack_trampoline' >>"$LOG" 2>&1 \
        || { rm -rf "$prefix"; die "[$kind] the installed interpreter does not run or lacks the perf trampoline"; }
    # (ldd's output in a variable: `ldd | grep -q` fails under pipefail when
    # grep stops reading early.)
    local deps
    deps=$(ldd "$py" 2>&1) || true
    case $kind in
        shared)
            [[ "$deps" == *"$prefix/lib/libpython3.13.so.1.0"* ]] \
                || { rm -rf "$prefix"; die "[$kind] $py does not link $prefix/lib/libpython3.13.so.1.0"; }
            check_no_frame_pointer "$prefix/lib/libpython3.13.so.1.0" || { rm -rf "$prefix"; die "[$kind] built with frame pointers"; }
            ;;
        static)
            if ls "$prefix"/lib/libpython3.13*.so* >/dev/null 2>&1 || [[ "$deps" == *libpython* ]]; then
                rm -rf "$prefix"; die "[$kind] a libpython shared object was built"
            fi
            check_no_frame_pointer "$py" || { rm -rf "$prefix"; die "[$kind] built with frame pointers"; }
            ;;
    esac
    "$py" -c 'import sys; print("optional modules:", *[m for m in ("ssl", "ctypes", "sqlite3", "lzma", "bz2", "zlib", "readline", "_uuid") if not __import__("importlib.util").util.find_spec(m) is None])' >>"$LOG" 2>&1 || true
    rm -rf "$bdir" "$stage"
    say "[$kind] built in $(( $(date +%s) - t0 ))s: $py"
}

for k in "${todo[@]}"; do
    build_one "$k"
done
say "done in $(( $(date +%s) - T0 ))s"
report

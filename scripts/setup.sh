#!/usr/bin/env bash
# Installs everything synchdb needs on a fresh Debian 12 machine (as root),
# then builds and installs the extension into the system PostgreSQL 15.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGRX_VERSION=0.18.0
PROFILE=${SYNCHDB_PROFILE:-release}

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo openssl; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "== apt-get install ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "== cargo install cargo-pgrx $PGRX_VERSION (takes a few minutes)"
    cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked
fi

if ! grep -q "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
    echo "== cargo pgrx init --pg15"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

echo "== building and installing synchdb ($PROFILE)"
if [ "$PROFILE" = release ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
else
    cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
fi
echo "== synchdb installed into $("$PG_CONFIG" --pkglibdir)"

#!/usr/bin/env bash
# Runs every test of synchdb on this machine (as root, Debian 12): installs
# what is missing, builds and installs the extension, checks formatting and
# lints, runs the pure unit tests, then the end-to-end tests, which start
# their own source and destination clusters on free ports in temporary
# directories and stop them again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --check
cargo fmt --check --manifest-path tests/e2e/Cargo.toml

echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
cargo clippy --release --all-targets --manifest-path tests/e2e/Cargo.toml -- -D warnings

echo "== unit tests"
cargo test --lib

echo "== source PostgreSQL versions for the version matrix (fetched once, cached)"
./scripts/pg-versions.sh

echo "== end-to-end tests"
cargo test --release --manifest-path tests/e2e/Cargo.toml -- --test-threads="${SYNCHDB_TEST_THREADS:-2}" "$@"

#!/usr/bin/env bash
# Long randomized differential runs of synchdb: the chaos test
# (tests/e2e/tests/chaos.rs) for seed SEED, SEED+1, ... one after another
# until MINUTES minutes have passed (the last seed started finishes after
# that). Prints each seed's result and a summary; exits 1 if any seed
# diverged or wedged. Each seed's full output is kept in
# /tmp/synchdb-chaos-run-<seed>.log, its failure report (seed, step log,
# destination log lines) in /tmp/synchdb-chaos-seed-<seed>.report.
#
# Usage (as root, from anywhere): ./scripts/chaos.sh SEED MINUTES
# The extension must already be installed: run ./scripts/setup.sh first.
# SYNCHDB_CHAOS_SECS sets the workload duration per seed (default 60).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ] || ! [[ $1 =~ ^[0-9]+$ ]] || ! [[ $2 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 SEED MINUTES" >&2
    exit 2
fi
seed=$1
minutes=$2
manifest=tests/e2e/Cargo.toml

echo "== building the chaos test"
if ! cargo test --release --manifest-path "$manifest" --test chaos --no-run >/dev/null 2>&1; then
    cargo test --release --manifest-path "$manifest" --test chaos --no-run
    exit 2
fi

end=$(($(date +%s) + minutes * 60))
passed=()
failed=()
while [ "$(date +%s)" -lt "$end" ]; do
    log=/tmp/synchdb-chaos-run-$seed.log
    started=$(date +%s)
    if SYNCHDB_CHAOS_SEEDS=$seed cargo test --release --manifest-path "$manifest" \
        --test chaos -- --nocapture >"$log" 2>&1; then
        echo "seed $seed: ok ($(($(date +%s) - started)) s)"
        passed+=("$seed")
    else
        cause=$(grep -m1 '^cause: ' "$log" | cut -c1-300)
        echo "seed $seed: FAILED ($(($(date +%s) - started)) s) ${cause:-see $log}"
        echo "    report: /tmp/synchdb-chaos-seed-$seed.report, output: $log"
        failed+=("$seed")
    fi
    seed=$((seed + 1))
done

echo "== summary: ${#passed[@]} seeds ok, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed seeds: ${failed[*]}"
    echo "reproduce one: SYNCHDB_CHAOS_SEEDS=<seed> cargo test --release --manifest-path $manifest --test chaos -- --nocapture"
    exit 1
fi

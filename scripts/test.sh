#!/usr/bin/env bash
# Installs what is missing, builds, and runs every check and test of Sluice, including the
# root/netns end-to-end tests. Fails on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property, integration)"
cargo test --workspace --locked

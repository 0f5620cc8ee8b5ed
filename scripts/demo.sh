#!/usr/bin/env bash
# README command 1: set up, then convert SmolLM2, start two share servers on loopback and
# compare private generation with plaintext generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hss-ee demo "$@"

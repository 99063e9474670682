#!/usr/bin/env bash
# Install what the demo needs, then run it: a 4-node cluster in network namespaces pulls one
# image at once through p2p-mirror and prints who served which bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec python3 -m lab.demo "$@"

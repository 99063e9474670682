#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (root: containerd, namespaces, tc).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec python3 -m pytest -q -p no:cacheprovider "$@"

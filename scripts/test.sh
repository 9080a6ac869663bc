#!/usr/bin/env bash
# Set up (scripts/setup_host.sh) and run the whole test suite: linters,
# type checks, unit tests, and the integration tests with real servers and
# real QEMU guests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_host.sh
export VMSHOP_WAREHOUSE=${VMSHOP_WAREHOUSE:-$PWD/var/warehouse}
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The README's test command: set up whatever is missing, then run the test suite on the CPU.
#     bash scripts/run_tests.sh [pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
focus_detr_setup --dev
cd "$ROOT"
# no arguments: pyproject.toml's testpaths (tests/)
exec "$PYTHON" -m pytest -q "$@"

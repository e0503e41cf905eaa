#!/usr/bin/env bash
# The main job on a fresh machine: install, then a short demo training on the embedded
# Shapes-world dataset. Extra arguments go to `rigtrain train`, e.g. --steps 200.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/setup/install.sh"
exec "${RIGTRAIN_VENV:-$root/.venv}/bin/rigtrain" train --preset demo "$@"

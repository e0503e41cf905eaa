#!/usr/bin/env bash
# Install what the tests need, then run them. Extra arguments go to pytest.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/setup/install.sh" --test || exit $?
cd "$root"
"${RIGTRAIN_VENV:-$root/.venv}/bin/python" -m pytest "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "setup/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"

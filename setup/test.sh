#!/usr/bin/env bash
# Install what the tests need, then run them. Extra arguments go to pytest.
#
# The tests run on pytest-xdist workers, one per core up to 4 (RIGTRAIN_TEST_WORKERS sets
# the count; 0 runs them in this process): most tests start `rigtrain` processes that
# spend their first seconds importing on one core, so two workers finish a 2-core
# machine's suite sooner than one. Each test file runs on one worker, so its fixtures are
# built once; the demo's file goes first (see tests/conftest.py).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/setup/install.sh" --test || exit $?
cd "$root"
workers=${RIGTRAIN_TEST_WORKERS:-auto}
parallel=()
if [ "$workers" != "0" ]; then
  parallel=(--numprocesses="$workers" --maxprocesses=4 --dist=loadfile --no-loadscope-reorder)
fi
"${RIGTRAIN_VENV:-$root/.venv}/bin/python" -m pytest "${parallel[@]}" "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "setup/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"

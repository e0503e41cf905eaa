#!/usr/bin/env bash
# Install what the tests need, then run them. Extra arguments go to pytest.
#
# The tests run in three pytest-xdist workers when the machine has two cores or more: most
# of the suite is short training runs, each a process that spends its time importing and
# setting up on one core, and many wait (on a timeout, a budget, ssh, a signal), so a third
# worker fills the waits of the other two; the demo run (the longest test) keeps a core to
# itself, the other workers stepping back in priority while it trains (tests/conftest.py).
# On 2 cores: 570 s of pytest with two workers, 449 s with three (and a smaller sweep test).
# RIGTRAIN_TEST_WORKERS=N sets the count; 0 runs them in this process, one after another.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/setup/install.sh" --test || exit $?
cd "$root"
bin="${RIGTRAIN_VENV:-$root/.venv}/bin"
# The house style first (pyproject.toml's [tool.ruff]): a few seconds, and a failure names
# the file and line. `ruff format .` and `ruff check --fix .` repair most of it.
"$bin/ruff" format --check --quiet . && "$bin/ruff" check --quiet . || {
  echo "setup/test.sh: ruff found style problems (above); run: $bin/ruff format . && $bin/ruff check --fix ." >&2
  exit 1
}
cores=$(nproc 2>/dev/null || echo 1)
workers=${RIGTRAIN_TEST_WORKERS:-$(( cores >= 2 ? 3 : 0 ))}
parallel=()
if [ "$workers" -gt 0 ]; then
  parallel=(-n "$workers")
fi
"$bin/python" -m pytest "${parallel[@]}" "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "setup/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"

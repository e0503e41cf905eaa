#!/usr/bin/env bash
# Install what the tests need, then run them. Extra arguments go to pytest.
#
# The tests run in two pytest-xdist workers when the machine has two cores or more: most
# of the suite is short training runs, each a process that spends its time importing and
# setting up on one core, so two at once halve that; the demo run (the longest test) has
# a core to itself. More workers than two gain little on bigger machines and start more
# torch imports. RIGTRAIN_TEST_WORKERS=0 runs them in this process, one after another.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/setup/install.sh" --test || exit $?
cd "$root"
cores=$(nproc 2>/dev/null || echo 1)
workers=${RIGTRAIN_TEST_WORKERS:-$(( cores >= 2 ? 2 : 0 ))}
parallel=()
if [ "$workers" -gt 0 ]; then
  parallel=(-n "$workers")
fi
"${RIGTRAIN_VENV:-$root/.venv}/bin/python" -m pytest "${parallel[@]}" "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "setup/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"

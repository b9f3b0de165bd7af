#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest. Exit code 5 ("no tests collected")
# is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$rc"

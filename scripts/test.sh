#!/usr/bin/env bash
# Install the test needs and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests start hundreds of Python processes that import this package and its dependencies:
# with bytecode caching off (some sandboxes set PYTHONDONTWRITEBYTECODE), each would compile
# them anew. On, the first import of each module compiles and caches it.
unset PYTHONDONTWRITEBYTECODE
RLHF_EXTRAS=dev,infra bash scripts/install.sh
# tests/test_infra.py runs infra/up.sh, which needs PostgreSQL's server binaries: a system
# package, so it is installed here (CI runs as root), never by infra/up.sh itself.
if ! command -v pg_ctl >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
  else
    echo "PostgreSQL server binaries missing: tests/test_infra.py will be skipped" \
         "(apt-get install -y postgresql)" >&2
  fi
fi
. scripts/_venv.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false RLHF_NO_PROGRESS=1
# Test files run in parallel, three at a time: most of the time of the slow ones is spent
# waiting on servers and subprocesses, so three share two cores well.
python -m pytest -q -n "${RLHF_TEST_WORKERS:-3}" --dist loadfile "$@"

#!/usr/bin/env bash
# What the deployments' workers clone, printed at `prefect deploy` (prefect.yaml's build steps):
#   git-source.sh repo    -> $RLHF_GIT_REPO, else the URL of the remote `origin`
#   git-source.sh branch  -> $RLHF_GIT_BRANCH, else the branch checked out here
# Workers clone the pushed branch, not this working directory: push before you deploy.
set -euo pipefail
case "${1:-}" in
  repo)
    url="${RLHF_GIT_REPO:-$(git remote get-url origin 2>/dev/null || true)}"
    if [ -z "$url" ]; then
      echo "error: no git remote 'origin' here: set RLHF_GIT_REPO to the repository workers clone" >&2
      exit 2
    fi
    echo "$url" ;;
  branch)
    echo "${RLHF_GIT_BRANCH:-$(git rev-parse --abbrev-ref HEAD)}" ;;
  *)
    echo "usage: git-source.sh repo|branch" >&2; exit 2 ;;
esac

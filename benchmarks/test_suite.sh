#!/usr/bin/env bash
# The test suite of 2026-11-27 (commit 34f80cc, 54 tests, run one after the other as its `make test`
# did) against the same 54 tests today run as `make test` runs them, one after the other on this
# machine; then the whole suite today. Figures: benchmarks/README.md, "Test suite wall time".
#   MNIST_SOURCE_DIR=../shared/data/mnist bash benchmarks/test_suite.sh
# The 54 today: benchmarks/suite_of_34f80cc.txt (one renamed since for what it checks now, one
# replaced by the Kubernetes test that also probes a running server).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MNIST_SOURCE_DIR:?set MNIST_SOURCE_DIR to the directory of the four MNIST .gz files}"
export MNIST_SOURCE_DIR
old=$(mktemp -d)/old-suite
git worktree add -q --detach "$old" 34f80cc
# 34f80cc's setup registers its kernel for the user; this project's kernel lives in .venv.
trap 'git worktree remove --force "$old"; rm -rf "$HOME/.local/share/jupyter/kernels/mnist-lifecycle"' EXIT
(cd "$old" && make setup >/dev/null 2>&1)

elapsed() {  # runs a command; prints pytest's last line and the wall seconds, kept in $took
  local start=$SECONDS
  "$@" 2>&1 | tail -1
  took=$((SECONDS - start))
  echo "$took s"
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "34f80cc's suite, one after the other:"
pushd "$old" >/dev/null
elapsed .tools/bin/uv run --frozen pytest -q -p no:cacheprovider
popd >/dev/null
then_s=$took
echo "the same 54 tests today, pytest -n auto:"
make setup >/dev/null 2>&1
elapsed .tools/bin/uv run --frozen pytest -n auto -q -p no:cacheprovider $(cat benchmarks/suite_of_34f80cc.txt)
echo "today / then: $(python3 -c "print(round($took / $then_s, 2))")"
echo "the whole suite today, pytest -n auto:"
elapsed .tools/bin/uv run --frozen pytest -n auto -q -p no:cacheprovider
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

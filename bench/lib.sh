# Sourced by every benchmark after its settings: `. "$(dirname "$0")/lib.sh" PACKAGE...`.
# Strict mode; the repository root as the working directory; the packages built in release
# (their binaries in "$T"); a scratch directory "$work" and a list "$pids" of background
# processes, both cleaned up on exit however the script ends.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
packages=()
for p in "$@"; do packages+=(-p "$p"); done
cargo build --release -q "${packages[@]}"
T="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

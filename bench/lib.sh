# Sourced by every benchmark after its settings: `. "$(dirname "$0")/lib.sh" PACKAGE...`.
# Strict mode; the repository root as the working directory; the packages built in release
# (their binaries in "$T"); a scratch directory "$work"; and `track PID` for background
# processes, which are stopped on exit however the script ends (the list is a file, so a
# process started inside `$(…)` is stopped too), before "$work" is removed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
packages=()
for p in "$@"; do packages+=(-p "$p"); done
cargo build --release -q "${packages[@]}"
T="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
track() { echo "$1" >>"$work/.pids"; }
cleanup() {
  if [ -f "$work/.pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/.pids"
  fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

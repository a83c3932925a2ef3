#!/usr/bin/env bash
# Wall time (median of 5) and peak memory of `biofoundry check` as a whole
# process on generated protocols. Usage: benches/check_memory.sh (prints a table)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --bin biofoundry --example generate_protocol
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf '| protocol | file size | wall time (median of 5) | peak RSS |\n|---|---|---|---|\n'
for spec in "steps 1000" "steps 10000" "steps 100000" "packed 10000"; do
  set -- $spec
  f="$dir/$1-$2.toml"
  target/release/examples/generate_protocol "$1" "$2" > "$f"
  : > "$dir/times"
  for _ in 1 2 3 4 5; do
    /usr/bin/time -f '%e %M' -a -o "$dir/times" target/release/biofoundry check "$f" > /dev/null
  done
  secs=$(cut -d' ' -f1 "$dir/times" | sort -n | sed -n 3p)
  kib=$(cut -d' ' -f2 "$dir/times" | sort -n | tail -1)
  printf '| %s %s | %s KiB | %s s | %s MiB |\n' "$1" "$2" "$(( $(stat -c %s "$f") / 1024 ))" "$secs" "$(( kib / 1024 ))"
done

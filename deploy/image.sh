#!/usr/bin/env bash
# Build the Sluice image FROM scratch with podman: the four binaries of BIN_DIR (stripped) and
# exactly the shared libraries `ldd` says they link, at the same paths, plus the dynamic loader.
# Nothing is pulled. Usage: deploy/image.sh BIN_DIR TAG
set -euo pipefail
bin_dir=${1:?usage: deploy/image.sh BIN_DIR TAG}
tag=${2:?usage: deploy/image.sh BIN_DIR TAG}
repo=$(cd "$(dirname "$0")/.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs/usr/bin"
libs=()
for b in sluice-control sluicectl sluice-agent sluice-cni; do
  strip -o "$stage/rootfs/usr/bin/$b" "$bin_dir/$b"
  # Lines are "name => /path (addr)" or "/path (addr)" (the loader); the vDSO has no file.
  while read -r path; do
    libs+=("$path")
  done < <(ldd "$bin_dir/$b" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }')
done
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  mkdir -p "$stage/rootfs$(dirname "$lib")"
  cp -L "$lib" "$stage/rootfs$lib"
done
(cd "$stage/rootfs" && find . -type f | sort | sed 's|^\.||') >"$stage/files"
echo "image files:" && cat "$stage/files"
podman build --network none --pull=never -f "$repo/Containerfile" -t "$tag" "$stage"

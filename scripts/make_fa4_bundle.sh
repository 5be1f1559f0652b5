#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4, CuTe DSL) for an offline GPU machine with Python 3.12 and CUDA 13. The CuTe-DSL
# compiler library is a 92 MB wheel (237 MB unpacked, most of it one x86-64 shared object); repacked as an xz
# tarball with xz's x86 branch filter it is ~52 MB, so the whole bundle (DIR/libs.tar.xz next to the small wheels
# DIR/*.whl) is ~62 MB and fits a 64 MiB transfer. PART_BYTES=N splits the tarball into DIR/libs.tar.xz.part-aa,
# -ab, ... for smaller limits. Needs PyPI. On the GPU machine, scripts/gpu_fa4_install.sh unpacks it.
#   scripts/make_fa4_bundle.sh .carry-fa4          # ~62 MB in all; compressing takes ~6 min on one core
set -eu
DIR=${1:-.carry-fa4}
FA4=${FA4_VERSION:-4.0.0b40}
DSL=${DSL_VERSION:-4.8.1}
PART=${PART_BYTES:-0}
mkdir -p "$DIR"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
         --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
# the pure-Python pieces and small native ones (torch, cuda-bindings, einops, protobuf are on the machine)
dl "$DIR" "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
   "nvidia-cutlass-dsl-libs-core==$DSL" "quack-kernels" "apache-tvm-ffi<0.2,>=0.1.11" "torch-c-dlpack-ext"
if [ ! -e "$DIR/libs.tar.xz" ] && [ ! -e "$DIR/libs.tar.xz.part-aa" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  dl "$tmp" "nvidia-cutlass-dsl-libs-cu13==$DSL"
  # --x86 (branch/call/jump filter) before LZMA2: ~18 % smaller on the compiler's machine code than -9e alone
  (cd "$tmp" && mkdir x && cd x && python3 -m zipfile -e ../nvidia_cutlass_dsl_libs_cu13-*.whl . \
     && tar cf - --owner=0 --group=0 . | xz --x86 --lzma2=preset=9e,dict=256MiB -T1 > ../libs.tar.xz)
  sha256sum "$tmp/libs.tar.xz" | cut -d' ' -f1 > "$DIR/libs.tar.xz.sha256"  # the install checks the pieces with it
  if [ "$PART" -gt 0 ]; then split -b "$PART" "$tmp/libs.tar.xz" "$DIR/libs.tar.xz.part-"
  else mv "$tmp/libs.tar.xz" "$DIR/libs.tar.xz"; fi
fi
ls -l "$DIR"; du -sh "$DIR"

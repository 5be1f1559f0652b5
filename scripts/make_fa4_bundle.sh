#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4, CuTe DSL) for an offline GPU machine with Python 3.12 and CUDA 13, packed in
# pieces that fit size-limited transfers: the CuTe-DSL compiler library alone is a 92 MB wheel (237 MB unpacked), so it
# travels as an xz tarball split in two (DIR/libs.tar.xz.part-aa, -ab) next to the small wheels (DIR/*.whl).
# Needs PyPI. On the GPU machine, scripts/gpu_fa4_install.sh puts the pieces back together.
#   scripts/make_fa4_bundle.sh .carry-fa4          # ~71 MB in all
set -eu
DIR=${1:-.carry-fa4}
FA4=${FA4_VERSION:-4.0.0b40}
DSL=${DSL_VERSION:-4.8.1}
PART=${PART_BYTES:-36000000}
mkdir -p "$DIR"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
         --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
# the pure-Python pieces and small native ones (torch, cuda-bindings, einops, protobuf are on the machine)
dl "$DIR" "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
   "nvidia-cutlass-dsl-libs-core==$DSL" "quack-kernels" "apache-tvm-ffi<0.2,>=0.1.11" "torch-c-dlpack-ext"
if [ ! -e "$DIR/libs.tar.xz.part-aa" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  dl "$tmp" "nvidia-cutlass-dsl-libs-cu13==$DSL"
  (cd "$tmp" && mkdir x && cd x && python3 -m zipfile -e ../nvidia_cutlass_dsl_libs_cu13-*.whl . \
     && tar cf - . | xz -9e -T0 > ../libs.tar.xz)
  split -b "$PART" "$tmp/libs.tar.xz" "$DIR/libs.tar.xz.part-"
fi
ls -l "$DIR"; du -sh "$DIR"

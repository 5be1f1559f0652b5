#!/usr/bin/env bash
# Pack what an offline GPU machine needs to build sp8192 shards itself: compressed training text, the
# validation documents and the tokenizers (default source: ../shared/data; default bundle: .carry/).
# Text travels instead of shards because xz'd text is ~4x smaller than uint16 token shards.
#   scripts/make_offline_bundle.sh [SOURCE_DIR] [BUNDLE_DIR] [N_WIKI_FILES]
set -euo pipefail
SRC=${1:-../shared/data}
DST=${2:-.carry}
N=${3:-46}
mkdir -p "$DST"
cp "$SRC"/tokenizers/fineweb_8192_bpe.model "$SRC"/tokenizers/fineweb_1024_bpe.model "$DST"/
xz -6 -T2 -c "$SRC"/challenge_val_prefix/docs_val_prefix_decoded.jsonl > "$DST"/val_docs.jsonl.xz
if [ ! -s "$DST"/wiki_text.jsonl.xz ]; then
  python3 - "$SRC" "$N" <<'PY' | xz -6 -T2 > "$DST"/wiki_text.jsonl.xz
import glob, json, sys
src, n = sys.argv[1], int(sys.argv[2])
for f in sorted(glob.glob(f"{src}/wikipedia_en_2015_substitute/*.jsonl"))[:n]:
    for line in open(f):
        sys.stdout.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
PY
fi
du -sh "$DST"/*

#!/usr/bin/env bash
# Image engine benchmark: pixmesh thumbnail vs vipsthumbnail vs ImageMagick, same machine, same run.
#
# For each photo in the corpus: every tool makes REPS thumbnails (WIDTH px wide, JPEG q80) in
# PROCS parallel single-threaded processes (both cores busy), and we report
#   thumbnails/s and the ratio against vipsthumbnail,
#   peak RSS of one single-image run and its ratio,
#   output bytes and their ratio,
#   PSNR against a reference made by libvips from the full-resolution image (Lanczos3).
#
# Usage: bench/imaging.sh [corpus-dir]      (default ../shared/corpus/photos)
# Env:   REPS (default 6), PROCS (default: cores), WIDTH (default 800), QUALITY (default 80)
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS="${1:-../shared/corpus/photos}"
REPS="${REPS:-6}"
PROCS="${PROCS:-$(nproc)}"
WIDTH="${WIDTH:-800}"
QUALITY="${QUALITY:-80}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need vipsthumbnail || ! need mogrify || ! need compare; then
  echo "installing libvips-tools and imagemagick ..." >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvips-tools imagemagick >/dev/null
fi
need /usr/bin/time || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; }

cargo build --release -q -p pixmesh
PIXMESH="${CARGO_TARGET_DIR:-target}/release/pixmesh"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export VIPS_CONCURRENCY=1 MAGICK_THREAD_LIMIT=1 OMP_NUM_THREADS=1

# $4 thumbnails of $1 by tool $2 into directory $3. Each thumbnail reads its own copy of the
# input under its own name: libvips caches operations by file name, so repeating one name would
# measure its cache, not its decoder.
run_tool() {
  local input="$1" tool="$2" out="$3" n="$4" files=() ext="${1##*.}"
  mkdir -p "$out/src"
  for i in $(seq "$n"); do
    cp "$input" "$out/src/in-$i.$ext"
    files+=("$out/src/in-$i.$ext")
  done
  case "$tool" in
    pixmesh) "$PIXMESH" thumbnail "${files[@]}" --width "$WIDTH" --format jpeg --quality "$QUALITY" --threads 1 -o "$out" ;;
    # Every tool strips metadata, as pixmesh does by default, so bytes compare pixels only.
    vips) vipsthumbnail "${files[@]}" --size "${WIDTH}x" -o "$out/%s.jpg[Q=$QUALITY,strip]" ;;
    magick) mogrify -path "$out" -format jpg -define "jpeg:size=$((WIDTH * 2))x" -filter Lanczos -resize "${WIDTH}x" -strip -quality "$QUALITY" "${files[@]}" ;;
  esac
}

# thumbnails/s with PROCS processes making REPS thumbnails each.
throughput() {
  local input="$1" tool="$2" start end pids=()
  for p in $(seq "$PROCS"); do rm -rf "$WORK/$tool-$p"; mkdir -p "$WORK/$tool-$p"; done
  start=$(date +%s.%N)
  for p in $(seq "$PROCS"); do
    run_tool "$input" "$tool" "$WORK/$tool-$p" "$REPS" >/dev/null 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  end=$(date +%s.%N)
  echo "$PROCS $REPS $start $end" | awk '{ printf "%.2f", ($1 * $2) / ($4 - $3) }'
}

# Peak RSS (KB) of one single-image run; leaves its output in $WORK/one-$tool.
peak_rss() {
  local input="$1" tool="$2"
  rm -rf "$WORK/one-$tool" && mkdir -p "$WORK/one-$tool"
  /usr/bin/time -f %M -o "$WORK/rss" bash -c "$(declare -f run_tool); PIXMESH=$PIXMESH WIDTH=$WIDTH QUALITY=$QUALITY run_tool '$input' $tool '$WORK/one-$tool' 1" >/dev/null 2>&1
  tail -1 "$WORK/rss"
}

# PSNR (dB) of $1 against the reference $2, both cropped to their common size.
psnr() {
  local out="$1" ref="$2" w h
  read -r w h < <(identify -format "%w %h\n" "$out")
  read -r rw rh < <(identify -format "%w %h\n" "$ref")
  w=$((w < rw ? w : rw)); h=$((h < rh ? h : rh))
  convert "$out" -crop "${w}x${h}+0+0" +repage "$WORK/a.png"
  convert "$ref" -crop "${w}x${h}+0+0" +repage "$WORK/b.png"
  compare -metric PSNR "$WORK/a.png" "$WORK/b.png" null: 2>&1 | awk '{ printf "%.2f", $1 }'
}

# The corpus's large JPEGs are progressive; add a baseline re-encode of the largest one (q90,
# 4:2:0, made by libvips, so the anchor reads its own kind of file) to cover that case too.
INPUTS=("$CORPUS"/*)
largest=$(ls -S "$CORPUS"/*.jpg 2>/dev/null | head -1 || true)
if [ -n "$largest" ]; then
  base="$WORK/inputs/$(basename "${largest%.*}")-baseline.jpg"
  mkdir -p "$WORK/inputs"
  vips copy "$largest" "$base[Q=90,strip]" && INPUTS+=("$base")
fi

printf "%-26s %8s %8s %8s %6s | %7s %7s %6s | %8s %8s %6s | %6s %6s %6s\n" \
  image pm/s vips/s im/s ratio pmMB vipsMB ratio pmKB vipsKB ratio psnrPM psnrV psnrIM
sum_ratio=0; n=0
for input in "${INPUTS[@]}"; do
  name="$(basename "$input")"
  width=$(identify -format "%w" "$input[0]" 2>/dev/null || echo 0)
  [ "$width" -gt 0 ] || continue
  vips resize "$input" "$WORK/ref.png" "$(echo "$WIDTH $width" | awk '{ print $1 / $2 }')" --kernel lanczos3 >/dev/null 2>&1
  pm=$(throughput "$input" pixmesh); vp=$(throughput "$input" vips); im=$(throughput "$input" magick)
  pm_rss=$(peak_rss "$input" pixmesh); vp_rss=$(peak_rss "$input" vips); peak_rss "$input" magick >/dev/null
  stem="${name%.*}"
  pm_out="$WORK/one-pixmesh/in-1.jpg"; vp_out="$WORK/one-vips/in-1.jpg"; im_out="$WORK/one-magick/in-1.jpg"
  pm_b=$(stat -c %s "$pm_out"); vp_b=$(stat -c %s "$vp_out")
  ratio=$(echo "$pm $vp" | awk '{ printf "%.2f", $1 / $2 }')
  printf "%-26s %8s %8s %8s %6s | %7.1f %7.1f %6.2f | %8.1f %8.1f %6.2f | %6s %6s %6s\n" \
    "$name" "$pm" "$vp" "$im" "$ratio" \
    "$(echo "$pm_rss" | awk '{ print $1 / 1024 }')" "$(echo "$vp_rss" | awk '{ print $1 / 1024 }')" "$(echo "$pm_rss $vp_rss" | awk '{ print $1 / $2 }')" \
    "$(echo "$pm_b" | awk '{ print $1 / 1024 }')" "$(echo "$vp_b" | awk '{ print $1 / 1024 }')" "$(echo "$pm_b $vp_b" | awk '{ print $1 / $2 }')" \
    "$(psnr "$pm_out" "$WORK/ref.png")" "$(psnr "$vp_out" "$WORK/ref.png")" "$(psnr "$im_out" "$WORK/ref.png")"
  sum_ratio=$(echo "$sum_ratio $ratio" | awk '{ print $1 + $2 }'); n=$((n + 1))
done
echo "$sum_ratio $n" | awk '{ printf "overall: pixmesh/vipsthumbnail thumbnails/s, mean ratio over %d images: %.2f\n", $2, $1 / $2 }'

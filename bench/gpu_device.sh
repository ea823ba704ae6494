#!/usr/bin/env sh
# The GPU measurements on a machine without a package index (the device tool's machines).
#
# Here, with an index:      sh bench/gpu_device.sh wheels
#   downloads into .gpu/whl (git-ignored) the wheels such a machine lacks: ../shared/gpu/wheels.txt
#   (or $WHEELS_TXT) plus fpng, pybase64, torchao and redis, for CPython 3.12 on x86-64.
# There, with .gpu carried: sh bench/gpu_device.sh run python3 -m bench.gpu_e2e ...
#   installs them into /tmp/site (no index, no dependencies) and runs the command with this
#   checkout and /tmp/site on PYTHONPATH; results go where the command writes them ($OUT).
# docs/benchmarks.md §4.4, §4.7-4.9 and §4.12 list the measurements still to make, each sized to one call.
# DRY_PLAN=1 sh bench/gpu_device.sh plan ITEM prints the command an item would run.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  wheels)
    list=${WHEELS_TXT:-$here/../shared/gpu/wheels.txt}
    [ -f "$list" ] || { echo "no wheel list at $list (set WHEELS_TXT)" >&2; exit 2; }
    # A fresh folder: two versions of one package would make the install there refuse both.
    rm -rf "$here/.gpu/whl"
    mkdir -p "$here/.gpu/whl"
    # shellcheck disable=SC2046
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$here/.gpu/whl" \
      $(grep -v '^#' "$list") fpng pybase64 torchao==0.18.0 lazy_loader redis
    ls "$here/.gpu/whl" | wc -l | xargs echo "wheels in .gpu/whl:"
    ;;
  run)
    shift
    [ -d "$here/.gpu/whl" ] || { echo "no .gpu/whl: run 'sh bench/gpu_device.sh wheels' here and carry .gpu" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$here"/.gpu/whl/*.whl
    PYTHONPATH="/tmp/site:$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec "$@"
    ;;
  session)
    # One device call that fits a whole session (15 min of device time, start-up included, at
    # most 10 min per call): plan item ${2:-d}, then, in the seconds left of ${3:-575}, that
    # item's served phase again (plan ITEM+: the same weights, the compile cache it left, a
    # second sample of the served figures). On 2026-11-27 item 0u took 354 s and its second
    # served phase 131 s (docs/benchmarks.md §4.9).
    : "${OUT:?set OUT to the folder the results go to}"
    item=${2:-d}
    end=$(( $(date +%s) + ${3:-575} ))
    timeout $(( end - $(date +%s) )) sh "$0" plan "$item" || echo "item $item ended with $?"
    left=$(( end - $(date +%s) ))
    # Items without a served phase (a trace, the bare variants) have nothing to repeat.
    DRY_PLAN=1 sh "$0" plan "$item+" >/dev/null 2>&1 || exit 0
    echo "left ${left}s for item $item+"
    [ "$left" -gt 150 ] || exit 0
    OUT="$OUT/again" exec timeout "$left" sh "$0" plan "$item+"
    ;;
  plan)
    # The measurements of docs/benchmarks.md §4.4-4.9 by number, so a short device session types
    # no long command lines: sh bench/gpu_device.sh plan 1 (then plan 1b at once, same machine).
    # ITEM+ runs ITEM's served phase again, same sizes and serve args: on the weights and
    # compile cache ITEM left, so it starts warm.
    full='--compile-scope full --compile-shapes batch'
    unet='--compile-scope unet --compile-shapes batch'
    item=${2:-}
    again=
    case "$item" in *+) again=1; item=${item%+} ;; esac
    # The served items set these: bench.gpu_e2e's phases, the server's flags (one argument) and
    # further bench.gpu_e2e arguments (split on spaces; none contains one).
    phases= serve= more=
    case "$item" in
      # Whether the whole UNet compiled with an eager decoder starts within the 240 s that
      # ../shared/gpu/measure_e2e.py waits for /ready, cold, and within 60 s warm, and what the
      # eager decoder costs against full's 1.493 images/s (§4.7). Measured in §4.9.
      0u) phases=served,warm serve=$unet more='--sizes 1024' ;;
      # Item 0u with CUDA graphs: one recorded per batch size 1..8 in warm-up (§4.9: 0.672 s for
      # one image bare, static shapes; 0.89-1.23 s served without graphs). Measured in §4.12:
      # 0.88 s, no faster, and a warm start of 64-67 s.
      gu) phases=served,warm serve="$unet --compile-mode reduce-overhead" more='--sizes 1024' ;;
      # Item 0u compiled ahead of time (torch.export + AOTInductor, §4.11): the cold start, a
      # warm start that loads the package without dynamo's trace (58 s for 0u in §4.9), and
      # whether a call without dynamo's guards and Python wrapper is faster. §4.12 measured the
      # cold start (283 s) and one request (0.848 s); its time ran out before the warm start.
      # Since 2026-11-27 (later session) aot builds in the background by default; au keeps
      # §4.12's flow, the package built in warm-up before ready.
      au) phases=served,warm serve="$unet --compile-method aot --aot-build foreground"
          more='--sizes 1024 --ready-limit 560' ;;
      # The default recipe since then (aot, the UNet and one image's decoder, built in the
      # background; §4.13): ready after an eager warm-up, three requests served eagerly while
      # the child builds, the time until its packages serve, then the served figures on them
      # and the warm start (loads the packages), then the bare pipeline on those packages
      # (barec: bare and served side by side). du: the same without the decoder's package.
      d) phases=served,warm,barec serve='--compile-method auto' more='--sizes 1024 --live-limit 560' ;;
      du) phases=served,warm serve='--compile-method aot --compile-scope unet'
          more='--sizes 1024 --live-limit 560' ;;
      # The default recipe with cuDNN attention (+6.7% eager at batch 8, §4.7): the packages
      # are exported with the attention kernel the server prefers (its own cache key).
      dc) phases=served,warm serve='--compile-method auto --attention-backend cudnn'
          more='--sizes 1024 --live-limit 560' ;;
      # CUDA graphs with static shapes: whole UNet and decoder, buckets 1 and 8 (each bucket's
      # graphs took about 138 s to compile in §4.9's bare run: may not fit one call).
      g) phases=served more='--sizes 1024 --ready-limit 560'
         serve='--compile-scope full --compile-shapes static --compile-mode reduce-overhead --batch-buckets 1,8' ;;
      # One call for a session that may get only one: eager with and without cuDNN attention and
      # cuDNN's convolution autotuner, then item 1 at one size and item 1b (a warm restart).
      0) phases=bare,served,warm serve=$full more='--sizes 1024 --bare-attention auto,cudnn,auto/bench' ;;
      # Item 0 with cuDNN attention in the server too (+6.7% eager at batch 8, §4.7).
      0c) phases=bare,served,warm serve="$full --attention-backend cudnn"
          more='--sizes 1024 --bare-attention auto,cudnn' ;;
      # Two warm-up sizes (1024² and 768²).
      1) phases=served serve=$full ;;
      1b) set -- python3 -m bench.gpu_e2e --phases warm --serve-args "$full" ;;
      2) set -- python3 -m bench.gpu_compile_variants --variants full-batch,full-static-graphs \
           --batches 1,8 ;;
      2b) set -- python3 -m bench.gpu_compile_variants --variants eager,eager-cudnn,full-batch-cudnn \
            --batches 1,8 ;;
      # fp8 adds --quantize fp8 itself; without a served phase in the same call there are no
      # bf16 images to compare with (its quality was measured with the regional recipe, §4.1).
      3) set -- python3 -m bench.gpu_e2e --phases fp8 --sizes 1024 --serve-args "$full" ;;
      4) set -- python3 -m bench.compile_features --scope full --shapes batch ;;
      # How much of a whole-UNet warm start is dynamo's trace on this host (measured in §4.9).
      t) set -- python3 -m bench.dynamo_trace ;;
      # How long opening an AOTInductor package takes with and without torch's host comparison
      # (§4.14: 32-36 s of the default recipe's warm start; about 2 min with the build).
      l) set -- python3 -m bench.aoti_load ;;
      *) echo "plan items: d du dc au 0u gu g 0 0c 1 1b 2 2b 3 4 t l, and ITEM+ (docs/benchmarks.md §4.4, §4.7-4.9)" >&2
         exit 2 ;;
    esac
    if [ -n "$again" ]; then
      [ -n "$serve" ] || { echo "item $item has no served phase to repeat" >&2; exit 2; }
      phases=served
    fi
    if [ -n "$serve" ]; then
      # shellcheck disable=SC2086
      set -- python3 -m bench.gpu_e2e --phases "$phases" --serve-args "$serve" $more
    fi
    if [ -n "${DRY_PLAN:-}" ]; then
      for arg in "$@"; do printf "'%s' " "$arg"; done
      echo
      exit 0
    fi
    exec sh "$0" run "$@"
    ;;
  *)
    echo "usage: sh bench/gpu_device.sh wheels | run COMMAND... | plan ITEM | session [ITEM [SECONDS]]" >&2
    exit 2
    ;;
esac

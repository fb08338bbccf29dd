#!/usr/bin/env bash
# Other commits' code against the wheel's, side by side on one GPU machine: the GPU time of their
# CUDA kernel sources, or (--host) the host time of their Python code around the kernels.
#
# On the build machine (no GPU needed), from the repository root:
#     make wheel && bash scripts/gpu-ab.sh prepare [--host] REV [REV ...]
# writes dist/ab/NAME/ ($AB_DIR/NAME/), NAME the short commit of each REV: the kernel sources
# (python/sparseroute/cuda) of each REV, or with --host its Python package code
# (python/sparseroute/**/*.py). Kernel sources must take the arguments that the wheel's host code
# passes: a kernel whose parameters changed between the commits (or that is missing) fails to
# launch, naming itself: its cases read "capture failed", a group whose setup launches it says
# that its inputs were not built, and the other groups still run. (At 6a6a926 the plan kernels
# took other arguments, and the keyed lane teams did not exist: compare those with the gpu-check
# records.) Python code runs on the wheel's compiled core and kernels: --host refuses a REV whose
# core stubs (_core.pyi) or kernel sources differ from HEAD's.
# On the GPU machine, from a copy of the repository root that includes dist/:
#     bash scripts/gpu-ab.sh run [--host] [CASE_GROUP ...]
# installs the wheel once, copies the installation for each dist/ab/NAME with that commit's
# files in place, and runs benches/gpu_ab.py (GPU time alone per case; with --host, host time
# per call) in each in turn: NAME ..., then the wheel's own as "wheel", $ROUNDS rounds (default
# 2; the host time of a call varies more between rounds), into $OUT/ab.log (default
# ./gpu-ab-out). Case groups: see benches/gpu_ab.py (default: all).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in
*/*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;  # run from benches/ too
esac
AB_DIR="${AB_DIR:-dist/ab}"

case "${1:-}" in
prepare)
    shift
    host=0
    if [ "${1:-}" = "--host" ]; then host=1; shift; fi
    [ "$#" -gt 0 ] || { echo "gpu-ab: name at least one commit" >&2; exit 2; }
    rm -rf "$AB_DIR"
    for rev in "$@"; do
        name=$(git rev-parse --short "$rev")
        mkdir -p "$AB_DIR/$name"
        if [ "$host" = 1 ]; then
            if ! git diff --quiet "$rev" HEAD -- python/sparseroute/_core.pyi python/sparseroute/cuda/; then
                echo "gpu-ab: $rev's core stubs or kernel sources differ from HEAD's; its Python code" \
                    "cannot run on this wheel (compare kernels without --host)" >&2
                exit 2
            fi
            for source in $(git ls-tree -r --name-only "$rev" python/sparseroute/ | grep '\.py$'); do
                target="$AB_DIR/$name/${source#python/}"
                mkdir -p "$(dirname "$target")"
                git show "$rev:$source" > "$target"
            done
            echo "$AB_DIR/$name: $(find "$AB_DIR/$name" -name '*.py' | wc -l) Python files of $rev"
        else
            for source in $(git ls-tree --name-only "$rev" python/sparseroute/cuda/); do
                git show "$rev:$source" > "$AB_DIR/$name/$(basename "$source")"
            done
            echo "$AB_DIR/$name: $(ls "$AB_DIR/$name" | wc -l) kernel sources of $rev"
        fi
    done
    ;;
run)
    shift
    measure=()
    if [ "${1:-}" = "--host" ]; then measure=(--host); shift; fi
    OUT="${OUT:-$PWD/gpu-ab-out}"
    ROUNDS="${ROUNDS:-2}"
    mkdir -p "$OUT"
    what="GPU time alone per call (a CUDA graph of ten calls replayed)"
    [ "${#measure[@]}" -eq 0 ] || what="host time per call (median of five batches of 200 calls)"
    echo "# $what, $ROUNDS rounds" | tee "$OUT/ab.log"
    wheel=$(ls -t dist/sparseroute-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || { echo "gpu-ab: no wheel in dist/; run 'make wheel' first" >&2; exit 2; }
    root=$(mktemp -d)
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$root/wheel" "$wheel"
    labels=()
    for sources in "$AB_DIR"/*/; do
        [ -d "$sources" ] || continue
        name=$(basename "$sources")
        cp -r "$root/wheel" "$root/$name"
        if [ -d "${sources}sparseroute" ]; then
            cp -r "${sources}sparseroute/." "$root/$name/sparseroute/"  # Python code (--host)
        else
            cp "$sources"*.cu* "$root/$name/sparseroute/cuda/"
        fi
        labels+=("$name")
    done
    labels+=(wheel)
    for round in $(seq "$ROUNDS"); do
        for label in "${labels[@]}"; do
            # From benches/, so that gpu_ab.py finds gpu_bench; each set compiles into its own
            # cache. A set that fails (a kernel whose parameters changed) is reported, not fatal.
            if ! (cd benches && PYTHONPATH="$root/$label" SPARSEROUTE_CACHE_DIR="$root/cache-$label" \
                "$PYTHON" gpu_ab.py "$label" ${measure[@]+"${measure[@]}"} "$@") 2>&1 | tee -a "$OUT/ab.log"; then
                echo "gpu-ab: $label failed" | tee -a "$OUT/ab.log"
            fi
        done
    done
    ;;
*)
    echo "usage: bash scripts/gpu-ab.sh prepare [--host] REV [REV ...] | run [--host] [CASE_GROUP ...]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Regenerate the README figures in docs/img/ from the bundled SmartMoE-like trace.
# Every policy runs dropless (capacity_factor none) so the speedups compare like with like.
#   bash analysis/examples/make_readme_figures.sh [RUNS_DIR]
set -euo pipefail
runs=${1:-runs/readme}
out=docs/img
mkdir -p "$out"
for policy in static_ep swiftmoe eplb laer_fsep smartmoe; do
    if [ ! -f "$runs/$policy/manifest.json" ]; then
        knobs=(--knob capacity_factor=none)
        # 16 GPUs x 2 slots = 32 experts leaves LAER no room for replicas; give it SwiftMoE's S=4
        [ "$policy" = laer_fsep ] && knobs+=(--knob slots_per_rank=4)
        python -m moesim simulate --policy "$policy" "${knobs[@]}" \
            --out "$runs/$policy" --timeline 10 --quiet
    fi
done
all=("$runs"/static_ep "$runs"/swiftmoe "$runs"/eplb "$runs"/laer_fsep "$runs"/smartmoe)
python -m moesim plot speedup "${all[@]}" -o "$out/speedup.png"
python -m moesim plot load_heatmap "$runs/static_ep" -o "$out/load_heatmap.png"
python -m moesim plot memory "${all[@]}" -o "$out/memory.png"
python -m moesim plot timeline "$runs/eplb" -o "$out/timeline.png"

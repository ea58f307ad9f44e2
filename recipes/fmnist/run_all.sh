#!/usr/bin/env bash
# Every Fashion-MNIST sweep of docs/results.md, in order; run from the repository root. Resumable: run it again
# (finished runs are skipped, interrupted ones resumed). Two runs at a time, one thread each (a 2-core CPU).
# Outputs in runs/fmnist/, figures in docs/figures/, tables: python recipes/fmnist/make_tables.py
set -u
J="--seeds 2 --jobs 2 --threads 1"
R=recipes/fmnist
F=docs/figures
DENSE="--ref dense=runs/fmnist/dense"
# Baselines: dense, static
timm-dst-sweep $R/mlp_dense.yaml $J --out runs/fmnist/dense --no-plot
timm-dst-sweep $R/mlp_static.yaml --grid sparsity=0.9,0.95,0.98 $J --out runs/fmnist/static --no-plot
# Figure 3: ΔT x sparsity (SET-ITOP)
timm-dst-sweep $R/mlp_set_itop.yaml --grid update_interval=2,10,50,200,800 --grid sparsity=0.9,0.95,0.98 $J $DENSE \
    --out runs/fmnist/fig3 --figure $F/fmnist_fig3_dt_sweep.png --title 'Fashion-MNIST MLP, SET-ITOP, 2 epochs'
# The runs the next sweeps share with Figure 3 / the dense sweep (same flags): link them instead of training again.
link() {  # link SRC_POINT DST_POINT
    for s in 0 1; do
        mkdir -p "$2"
        [ -e "$2/seed$s" ] || ln -s "$(realpath "$1/seed$s")" "$2/seed$s"
    done
}
for dt in 10 50 200 800; do
    link runs/fmnist/fig3/update_interval=$dt,sparsity=0.95 runs/fmnist/fig5/update_interval=$dt,dst=set-itop
done
for dt in 50 200 800; do
    link runs/fmnist/fig3/update_interval=$dt,sparsity=0.95 \
        runs/fmnist/table5/update_interval=$dt,grow_unexplored_first=False
done
for sp in 0.95 0.98; do
    link runs/fmnist/fig3/update_interval=200,sparsity=$sp runs/fmnist/fig4/epochs=2,sparsity=$sp
done
link runs/fmnist/dense/default runs/fmnist/dense_extended/epochs=2
# Figure 5: SET vs RigL at sparsity 0.95
timm-dst-sweep $R/mlp_set_itop.yaml --grid update_interval=10,50,200,800 --grid dst=set-itop,rigl-itop $J $DENSE \
    --out runs/fmnist/fig5 --figure $F/fmnist_fig5_set_vs_rigl.png --title 'Fashion-MNIST MLP, sparsity 0.95, 2 epochs'
# Table 5: SET vs SET+ at sparsity 0.95
timm-dst-sweep $R/mlp_set_itop.yaml --grid update_interval=50,200,800 --grid grow_unexplored_first=false,true $J \
    $DENSE --out runs/fmnist/table5 --figure $F/fmnist_table5_set_plus.png \
    --title 'Fashion-MNIST MLP, SET vs SET+, sparsity 0.95'
# Figure 4: extended training (4x epochs, ΔT 200), and the dense model trained 4x as long
timm-dst-sweep $R/mlp_set_itop.yaml --grid epochs=2,8 --grid sparsity=0.95,0.98 $J $DENSE \
    --out runs/fmnist/fig4 --figure $F/fmnist_fig4_extended.png --title 'Fashion-MNIST MLP, SET-ITOP ΔT 200, extended training'
timm-dst-sweep $R/mlp_dense.yaml --grid epochs=2,8 $J --out runs/fmnist/dense_extended --no-plot

#!/usr/bin/env bash
# Every paper-scale Fashion-MNIST sweep of docs/results.md (issues #19, #24), most important first; run from the
# repository root. Resumable: run it again (finished runs are skipped, interrupted ones resumed with --resume).
# One run at a time, one thread (each run takes 3-5 min x its epoch factor on one core). Outputs in
# runs/itop_fmnist/, figures in docs/figures/, tables: python recipes/itop_fmnist/make_tables.py
set -u
S="timm-dst-sweep"
J="--seeds 2 --jobs ${JOBS:-1} --threads 1 --no-plot"
R=recipes/itop_fmnist
O=${OUT:-runs/itop_fmnist}  # OUT=/elsewhere keeps the runs outside the checkout
A=recipes/itop_fmnist/results  # each finished run's results.json, kept in the repository (make_tables.py reads them)
link() {  # link SRC_POINT DST_POINT: share the runs of one point between two sweeps
    for s in 0 1; do
        mkdir -p "$2"
        [ -e "$2/seed$s" ] || ln -s "$(realpath "$1")/seed$s" "$2/seed$s"
    done
}
# 1. The comparison with the official ITOP code (issue #24): every configuration the official code was run on, on all
#    60,000 training images (no validation split, final weights), as the official runs, with 3 seeds
F60="--train-args=--val-fraction=0"
J3="--seeds 3 --jobs ${JOBS:-1} --threads 1 --no-plot"
$S $R/mlp_static.yaml --grid sparsity=0.98,0.95 $J3 "$F60" --out $O/full60k/static --archive $A/full60k/static
$S $R/mlp_set_itop.yaml --grid update_interval=4000,1500 --grid sparsity=0.98 $J3 "$F60" --out $O/full60k/fig3 --archive $A/full60k/fig3
$S $R/mlp_rigl_itop.yaml --grid sparsity=0.98 $J3 "$F60" --out $O/full60k/rigl --archive $A/full60k/rigl
$S $R/mlp_set_itop.yaml --grid update_interval=1500 --grid grow_unexplored_first=true $J3 "$F60" --out $O/full60k/table5 --archive $A/full60k/table5
$S $R/mlp_dense.yaml $J3 "$F60" --out $O/full60k/dense --archive $A/full60k/dense
$S $R/mlp_set_itop.yaml --grid update_interval=500,100,30 --grid sparsity=0.98 $J3 "$F60" --out $O/full60k/fig3 --archive $A/full60k/fig3
# 1b. At 98% with our recipes' validation split (54,000 training images, best-on-validation weights)
$S $R/mlp_dense.yaml $J --out $O/dense --archive $A/dense
$S $R/mlp_static.yaml --grid sparsity=0.98 $J --out $O/static --archive $A/static
$S $R/mlp_set_itop.yaml --grid update_interval=1500,500,100 --grid sparsity=0.98 $J --out $O/fig3 --archive $A/fig3
$S $R/mlp_rigl_itop.yaml --grid sparsity=0.98 $J --out $O/rigl --archive $A/rigl
$S $R/mlp_set_itop.yaml --grid update_interval=1500,500 --grid grow_unexplored_first=true $J --out $O/table5 --archive $A/table5
$S $R/mlp_set_itop.yaml --grid update_interval=4000,30 --grid sparsity=0.98 $J --out $O/fig3 --archive $A/fig3
$S $R/mlp_static.yaml --grid sparsity=0.95 $J --out $O/static --archive $A/static
# 2. Figure 4 / 5 at 98%: extended training, and the control that stops exploring at the 1x point
$S $R/mlp_set_itop_x2.yaml --grid sparsity=0.98 $J --out $O/fig4_x2 --archive $A/fig4_x2
$S $R/mlp_set_itop_x2.yaml --grid sparsity=0.98 --grid update_end=0.5 $J --out $O/fig4_x2 --archive $A/fig4_x2
$S $R/mlp_dsr.yaml --grid sparsity=0.98,0.9 $J --out $O/dsr --archive $A/dsr
$S $R/mlp_set_itop_x5.yaml --grid sparsity=0.98 $J --out $O/fig4_x5 --archive $A/fig4_x5
$S $R/mlp_set_itop_x5.yaml --grid sparsity=0.98 --grid update_end=0.2 $J --out $O/fig4_x5 --archive $A/fig4_x5
$S $R/mlp_rigl_itop_x5.yaml --grid sparsity=0.98 $J --out $O/rigl_x5 --archive $A/rigl_x5
# 3. Figure 3 at 95% and 90%
$S $R/mlp_static.yaml --grid sparsity=0.9 $J --out $O/static --archive $A/static
$S $R/mlp_set_itop.yaml --grid update_interval=1500,500,100,4000,30 --grid sparsity=0.95,0.9 $J --out $O/fig3 --archive $A/fig3
# 4. Optional: 10x at 98%
[ -n "${WITH_X10:-}" ] && $S $R/mlp_set_itop_x10.yaml --grid sparsity=0.98 $J --out $O/fig4_x10 --archive $A/fig4_x10
# Collect every sweep over its whole grid (the partial calls above each rewrite sweep.csv with their own points)
for sp in 0.98 0.95 0.9; do
    link $O/fig3/update_interval=1500,sparsity=$sp $O/fig5/dst=set-itop,sparsity=$sp
done
link $O/fig3/update_interval=1500,sparsity=0.98 $O/table5/update_interval=1500,grow_unexplored_first=False
link $O/fig3/update_interval=500,sparsity=0.98 $O/table5/update_interval=500,grow_unexplored_first=False
C="--seeds 2 --collect-only"
$S $R/mlp_dense.yaml $C --out $O/dense --no-plot
$S $R/mlp_static.yaml --grid sparsity=0.9,0.95,0.98 $C --out $O/static --no-plot
$S $R/mlp_set_itop.yaml --grid update_interval=30,100,500,1500,4000 --grid sparsity=0.9,0.95,0.98 $C --out $O/fig3 --archive $A/fig3 \
    --ref dense=$O/dense --figure docs/figures/itop_fmnist_fig3.png \
    --title 'Fashion-MNIST, MLP 784-1024-512-10, SET-ITOP, 40 epochs'
$S $R/mlp_set_itop.yaml --grid update_interval=500,1500 --grid grow_unexplored_first=false,true $C --out $O/table5 --archive $A/table5 \
    --no-plot

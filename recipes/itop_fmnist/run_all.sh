#!/usr/bin/env bash
# Every paper-scale Fashion-MNIST sweep of docs/results.md (issues #19, #24), most important first; run from the
# repository root. Resumable: run it again (finished runs are skipped, interrupted ones resumed with --resume).
# JOBS runs at a time (default 1), one thread each: a 40-epoch run takes 3.5-8 min on one core. Runs in
# $OUT (default runs/itop_fmnist/); each finished run's results.json is archived into recipes/itop_fmnist/results/
# (commit it: the tables and figures are drawn from there). Then:
#   python recipes/itop_fmnist/make_tables.py --figures docs/figures
set -u
S="timm-dst-sweep"
J="--seeds 2 --jobs ${JOBS:-1} --threads 1 --no-plot"
J3="--seeds 3 --jobs ${JOBS:-1} --threads 1 --no-plot"
R=recipes/itop_fmnist
O=${OUT:-runs/itop_fmnist}  # OUT=/elsewhere keeps the runs outside the checkout
A=recipes/itop_fmnist/results
run() {  # run SWEEP RECIPE ARGS...: one timm-dst-sweep call into $O/SWEEP, archived into $A/SWEEP
    local sweep=$1 recipe=$2
    shift 2
    $S "$R/$recipe" "$@" --out "$O/$sweep" --archive "$A/$sweep"
}
# 1. The comparison with the official ITOP code: every configuration the official code was run on (issue #19), on all
#    60,000 training images (no validation split, final weights) as the official runs, with 3 seeds
F60="--train-args=--val-fraction=0"
run full60k/static mlp_static.yaml --grid sparsity=0.98,0.95 $J3 "$F60"
run full60k/fig3 mlp_set_itop.yaml --grid update_interval=30,4000,1500,500,100 --grid sparsity=0.98 $J3 "$F60"
run full60k/rigl mlp_rigl_itop.yaml --grid sparsity=0.98 $J3 "$F60"
run full60k/table5 mlp_set_itop.yaml --grid update_interval=1500 --grid grow_unexplored_first=true $J3 "$F60"
run full60k/dense mlp_dense.yaml $J3 "$F60"
# 2. At 98% with our recipes' validation split (54,000 training images)
run dense mlp_dense.yaml $J
run static mlp_static.yaml --grid sparsity=0.98,0.95,0.9 $J
run fig3 mlp_set_itop.yaml --grid update_interval=1500,500,100,4000,30 --grid sparsity=0.98 $J
run rigl mlp_rigl_itop.yaml --grid sparsity=0.98 $J
run table5 mlp_set_itop.yaml --grid update_interval=1500,500 --grid grow_unexplored_first=true $J
# 3. Figure 3 at 95% and 90%
run fig3 mlp_set_itop.yaml --grid update_interval=1500,500,100,4000,30 --grid sparsity=0.95,0.9 $J
# 4. DSR, and Figure 4 / 5 at 98%: extended training, and the control that stops exploring at the 1x point
run dsr mlp_dsr.yaml --grid sparsity=0.98,0.9 $J
run fig4_x2 mlp_set_itop_x2.yaml --grid sparsity=0.98 $J
run fig4_x2 mlp_set_itop_x2.yaml --grid sparsity=0.98 --grid update_end=0.5 $J
run fig4_x5 mlp_set_itop_x5.yaml --grid sparsity=0.98 $J
run rigl_x5 mlp_rigl_itop_x5.yaml --grid sparsity=0.98 $J
run fig4_x5 mlp_set_itop_x5.yaml --grid sparsity=0.98 --grid update_end=0.2 $J
# 5. Optional: 10x at 98%
if [ -n "${WITH_X10:-}" ]; then run fig4_x10 mlp_set_itop_x10.yaml --grid sparsity=0.98 $J; fi
python $R/make_tables.py --figures docs/figures

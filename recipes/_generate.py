"""Writes the paper recipes of recipes/itop/ (ITOP, Liu et al. 2021) and recipes/dsr/ (DSR, Mostafa & Wang 2019).

Run from anywhere: ``python recipes/_generate.py``. Figure 7 has its own generator (recipes/fig7/_generate.py); the
Fashion-MNIST counterparts (recipes/fmnist/) are written by hand. See recipes/README.md for the table of recipes.
"""
from __future__ import annotations

import math
import os

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))

CIFAR_TRAIN = 50000
IMAGENET_TRAIN = 1281167
VAL_FRACTION = 0.1  # ITOP Appendix A.3: 10% of the training data held out for validation


def steps_per_epoch(train_size: int, batch_size: int, val_fraction: float = VAL_FRACTION) -> int:
    """Optimizer steps per epoch of the CLI (the last partial batch is kept)."""
    n_val = int(round(train_size * val_fraction))
    return math.ceil((train_size - n_val) / batch_size)


def milestones(*epochs: int) -> list[int]:
    """timm's ``decay_milestones`` for lr drops after ``epochs`` epochs (the papers' milestones, PyTorch MultiStepLR
    style: the first m epochs train at the initial lr). timm applies milestone m from 0-based epoch m - 1, so each is
    written m + 1 (recipes/README.md, "How timm counts milestones")."""
    return [e + 1 for e in epochs]


def milestones_comment(decay_milestones: list[int]) -> str:
    """The header line of a multistep recipe: the paper's epochs of its lr drops."""
    return (f'# lr drops after epochs {" / ".join(str(m - 1) for m in decay_milestones)}; timm\'s decay_milestones '
            f'are these + 1 (recipes/README.md)\n')


def every_iters(iters: int, batch_size: int, train_size: int = CIFAR_TRAIN) -> dict:
    """A 10x lr drop every ``iters`` optimizer steps (the sparse-learning code's StepLR(decay_frequency), stepped per
    mini-batch), as a timm step schedule counted in updates."""
    return dict(sched='step', sched_on_updates=True,
                decay_epochs=round(iters / steps_per_epoch(train_size, batch_size), 4), decay_rate=0.1)


# the papers' CIFAR augmentation: pad-4-and-crop and flips only (timm's default colour jitter off)
CIFAR = dict(val_fraction=VAL_FRACTION, crop_padding=4, hflip=0.5, color_jitter=0.0, opt='nesterov', momentum=0.9,
             warmup_epochs=0, seed=42)
EXPLORE = dict(prune_rate=0.5, prune_rate_schedule='cosine')

# ITOP Table 3 (Section 3.2 typical training; the ΔT column is the extended-training ΔT of Figure 4)
TABLE3 = {
    'mlp_cifar10': dict(model='itop_mlp', dataset='torch/cifar10', lr=0.01, batch_size=128, epochs=200,
                        weight_decay=5.0e-4, distribution='er', update_interval=1500, **every_iters(24000, 128)),
    'vgg16_cifar10': dict(model='vgg16c_cifar', dataset='torch/cifar10', lr=0.1, batch_size=128, epochs=250,
                          weight_decay=5.0e-4, distribution='erk', update_interval=2000, **every_iters(30000, 128)),
    'resnet34_cifar100': dict(model='resnet34_cifar', dataset='torch/cifar100', lr=0.1, batch_size=128, epochs=200,
                              weight_decay=1.0e-4, distribution='erk', update_interval=1000, sched='multistep',
                              decay_milestones=milestones(100, 150), decay_rate=0.1),
}
EXTEND = (2, 5, 10, 20)  # Figure 4 / 5 extended training: epochs and lr anchors x k (Table 4: 200 -> 4000 is x20)
BATCH_SIZES = (8, 16, 32, 64, 128, 256)  # Figure 6 / 10


def _scaled(cfg: dict, k: int) -> dict:
    """Extended training: epochs and the lr schedule's anchors scaled by ``k`` (ITOP Appendix A.3)."""
    cfg = dict(cfg, epochs=cfg['epochs'] * k)
    if cfg['sched'] == 'multistep':
        cfg['decay_milestones'] = milestones(*[(m - 1) * k for m in cfg['decay_milestones']])  # paper epochs x k
    else:
        cfg['decay_epochs'] = round(cfg['decay_epochs'] * k, 4)
    return cfg


def itop_recipes() -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    sparsity = 0.9

    def add(name: str, head: str, cfg: dict) -> None:
        full = dict(CIFAR) if 'imagenet' not in name else {}
        full.update(cfg)
        full['output'] = 'output/itop'
        full['experiment'] = name
        out[name] = (head, full)

    for setting, base in TABLE3.items():
        cfg = dict(base, dst='set-itop', sparsity=sparsity, **EXPLORE)
        add(f'fig3_{setting}_set', f'ITOP Table 3 / Figure 3, {setting}: SET-ITOP, typical training; sweep ΔT and '
            f'sparsity (recipes/README.md)', cfg)
        add(f'fig3_{setting}_static', f'ITOP Figure 3-4, {setting}: "Static" (no exploration)',
            {k: v for k, v in dict(base, dst='static', sparsity=sparsity).items() if k != 'update_interval'})
        add(f'fig3_{setting}_dense', f'ITOP Figure 3-4, {setting}: dense baseline',
            {k: v for k, v in dict(base, dst='dense').items() if k not in ('update_interval', 'distribution')})
        for k in EXTEND:
            add(f'fig4_{setting}_set_x{k}', f'ITOP Figure 4, {setting}: SET-ITOP, extended training x{k} (epochs and '
                f'lr anchors x{k}, ΔT {base["update_interval"]})', _scaled(cfg, k))
    # Figure 5: RigL vs SET on the MLP (Table 3 RigL row: ΔT 4000 for the extended runs)
    rigl = dict(TABLE3['mlp_cifar10'], dst='rigl-itop', sparsity=sparsity, update_interval=4000, **EXPLORE)
    add('fig5_mlp_cifar10_rigl', 'ITOP Table 3 / Figure 5, MLP CIFAR-10: RigL-ITOP, typical training; sweep ΔT', rigl)
    for k in EXTEND:
        add(f'fig5_mlp_cifar10_rigl_x{k}', f'ITOP Figure 5, MLP CIFAR-10: RigL-ITOP, extended training x{k} (ΔT 4000)',
            _scaled(rigl, k))
    # Figure 6 / 10: batch sizes, ΔT 1500 (SET) / 4000 (RigL); lr drops stay every 24000 iterations
    for bs in BATCH_SIZES:
        sched = every_iters(24000, bs)
        for dst, dt in (('set-itop', 1500), ('rigl-itop', 4000), ('dense', None)):
            cfg = dict(TABLE3['mlp_cifar10'], batch_size=bs, dst=dst, **sched)
            if dst == 'dense':
                cfg = {k: v for k, v in cfg.items() if k not in ('update_interval', 'distribution')}
            else:
                cfg.update(sparsity=sparsity, update_interval=dt, **EXPLORE)
            tag = {'set-itop': 'set', 'rigl-itop': 'rigl', 'dense': 'dense'}[dst]
            fig = 'Figure 6' if dst != 'rigl-itop' else 'Figure 10 (Appendix E)'
            add(f'fig6_mlp_cifar10_{tag}_b{bs}', f'ITOP {fig}, MLP CIFAR-10: {dst}, batch size {bs}', cfg)
    # Table 4: SET-ITOP / RigL-ITOP with the small batch (32) of the typical runs; extended runs use batch 128
    for setting in ('mlp_cifar10', 'resnet34_cifar100'):
        base = TABLE3[setting]
        sched = every_iters(24000, 32) if setting == 'mlp_cifar10' else {}
        for dst, dt in (('set-itop', 1500), ('rigl-itop', 4000)):
            cfg = dict(base, batch_size=32, dst=dst, sparsity=sparsity, update_interval=dt, **EXPLORE, **sched)
            add(f'table4_{setting}_{dst.replace("-", "_")}', f'ITOP Table 4, {setting}: {dst}, typical training '
                f'(batch 32, 200 epochs, ΔT {dt})', cfg)
            ext = _scaled(dict(base, dst=dst, sparsity=sparsity, update_interval=dt, **EXPLORE), 20)
            add(f'table4_{setting}_{dst.replace("-", "_")}_extended', f'ITOP Table 4, {setting}: {dst}, extended '
                f'training (batch 128, 4000 epochs, ΔT {dt})', ext)
    # Table 4 / Section 4.4 / Table 2: RigL-ITOP ResNet-50 on ImageNet. The official ImageNet/main.py sets the lr per
    # epoch: warm-up in epochs 0-4, then 0.1 up to epoch 29, x0.1 from epochs 30 / 60 / 90. With warmup_prefix False
    # timm counts the warm-up inside the schedule, so the first step is 30 epochs of which 5 are warm-up.
    for s in (0.8, 0.9):
        add(f'table4_resnet50_imagenet_rigl_itop_s{round(s * 100)}',
            f'ITOP Table 4 / Table 2, ResNet-50 ImageNet: RigL-ITOP at sparsity {s}',
            dict(model='resnet50', dataset='folder', data_dir='data/imagenet', val_fraction=0.0,
                 batch_size=64, epochs=100, opt='momentum', momentum=0.9, lr=0.1, weight_decay=1.0e-4,
                 sched='multistep', decay_milestones=milestones(30, 60, 90), decay_rate=0.1, warmup_epochs=5,
                 warmup_lr=1.0e-4, warmup_prefix=False, dst='rigl-itop', sparsity=s, distribution='erk',
                 update_interval=4000, **EXPLORE, workers=8, pin_mem=True, amp=True, seed=42))
    # Tables 1 and 5: ResNet-18 on CIFAR-10, 250 epochs, lr 0.1 with 10x drops at 125 / 187, batch 128
    r18 = dict(model='resnet18_cifar', dataset='torch/cifar10', lr=0.1, batch_size=128, epochs=250,
               weight_decay=5.0e-4, sched='multistep', decay_milestones=milestones(125, 187), decay_rate=0.1,
               distribution='erk', dst='set-itop', update_interval=5000, **EXPLORE)
    add('table1_resnet18_cifar10_set', 'ITOP Table 1, ResNet-18 CIFAR-10: SET at sparsity 0.95; sweep the pruning '
        'rate P and ΔT', dict(r18, sparsity=0.95))
    add('table5_resnet18_cifar10_set', 'ITOP Table 5, ResNet-18 CIFAR-10: SET (P 0.5); sweep sparsity and ΔT',
        dict(r18, sparsity=0.95))
    add('table5_resnet18_cifar10_set_plus', 'ITOP Table 5 / Appendix F, ResNet-18 CIFAR-10: SET+ (grow never-'
        'activated weights first, P 0.5); sweep sparsity and ΔT', dict(r18, sparsity=0.95, grow_unexplored_first=True))
    return out


def dsr_recipes() -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    # WRN-28-2 / CIFAR-10, the official code's script: Nesterov SGD lr 0.1, wd 5e-4, x0.2 at epochs 60 / 120 / 160,
    # 200 epochs, batch 128; reallocation period 100 / 200 / 400 / 800 iterations from epochs 0 / 25 / 80 / 140,
    # no reallocation after epoch 190; Np 20000, H0 1e-3, delta 0.1. The paper trains on the whole training set.
    # The lr steps are read as PyTorch's MultiStepLR milestones (60 / 60 / 40 / 40 epochs); the script steps it
    # through ignite's LRScheduler on EPOCH_STARTED, which in the ignite of 2019 applied each drop one epoch earlier.
    spe = steps_per_epoch(CIFAR_TRAIN, 128, 0.0)
    wrn = dict(model='wrn28_2', dataset='torch/cifar10', val_fraction=0.0, crop_padding=4, hflip=0.5,
               color_jitter=0.0, batch_size=128, epochs=200, opt='nesterov', momentum=0.9, lr=0.1, weight_decay=5.0e-4,
               sched='multistep', decay_milestones=milestones(60, 120, 160), decay_rate=0.2, warmup_epochs=0, dst='dsr',
               distribution='uniform', update_interval=100,
               update_milestones=[[0, 100], [25 * spe, 200], [80 * spe, 400], [140 * spe, 800]],
               update_end=190 * spe, dsr_np=20000, dsr_threshold=1.0e-3, dsr_tolerance=0.1,
               dense_first_layer=True, seed=42, output='output/dsr')
    for s in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f'wrn28_2_cifar10_dsr_s{round(s * 100)}'] = (
            f'DSR (Mostafa & Wang 2019) WRN-28-2 / CIFAR-10 at sparsity {s}', dict(wrn, sparsity=s))
    # ResNet-50 / ImageNet: Np 400000, reallocation every 1000 / 2000 / 4000 / 8000 iterations from epochs
    # 0 / 25 / 50 / 75, none after 95; the usual ResNet-50 schedule (batch 256, lr 0.1, x0.1 at 30 / 60 / 90).
    spe = steps_per_epoch(IMAGENET_TRAIN, 256, 0.0)
    r50 = dict(model='resnet50', dataset='folder', data_dir='data/imagenet', val_fraction=0.0,
               batch_size=256, epochs=100, opt='nesterov', momentum=0.9, lr=0.1, weight_decay=1.0e-4,
               sched='multistep', decay_milestones=milestones(30, 60, 90), decay_rate=0.1, warmup_epochs=0, dst='dsr',
               distribution='uniform', update_interval=1000,
               update_milestones=[[0, 1000], [25 * spe, 2000], [50 * spe, 4000], [75 * spe, 8000]],
               update_end=95 * spe, dsr_np=400000, dsr_threshold=1.0e-3, dsr_tolerance=0.1,
               dense_first_layer=True, exclude=['*downsample*'], workers=8, pin_mem=True, amp=True, seed=42,
               output='output/dsr')
    for s in (0.8, 0.9):
        out[f'resnet50_imagenet_dsr_s{round(s * 100)}'] = (
            f'DSR (Mostafa & Wang 2019) ResNet-50 / ImageNet at sparsity {s} (Table 2)', dict(r50, sparsity=s))
    for name, (_, cfg) in out.items():
        cfg['experiment'] = name
    return out


def write(folder: str, recipes: dict[str, tuple[str, dict]]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, (head, cfg) in recipes.items():
        with open(os.path.join(folder, name + '.yaml'), 'w') as f:
            f.write(f'# {head}\n# generated by recipes/_generate.py; see recipes/README.md\n')
            if cfg.get('sched') == 'multistep':
                f.write(milestones_comment(cfg['decay_milestones']))
            yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None, allow_unicode=True)


def main() -> None:
    write(os.path.join(HERE, 'itop'), itop_recipes())
    write(os.path.join(HERE, 'dsr'), dsr_recipes())


if __name__ == '__main__':
    main()

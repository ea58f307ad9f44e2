"""DST for timm training programs: the flag group, the sparsifier from parsed arguments, the checkpoint layout.

The same pieces serve ``timm-dst-train``, the launcher (``python -m timm_dst.run train.py ...``) and users who edit
their own copy of timm's ``train.py`` (docs/timm-train.md shows the diff)::

    from timm_dst.integrations import timm as dst_timm

    dst_timm.add_dst_args(parser)                 # --dst, --sparsity, --update-interval, ... and the methods' flags
    ...
    optimizer = create_optimizer_v2(model, ...)
    # after the optional resume, before EMA, DDP and torch.compile
    sparsifier = dst_timm.create_sparsifier_from_args(model, optimizer, args, resume=args.resume)
    ...
    saver = dst_timm.pack_saver(utils.CheckpointSaver(...), sparsifier)
    lr_scheduler, num_epochs = create_scheduler_v2(...)
    dst_timm.begin_training(sparsifier, num_epochs * updates_per_epoch)

Modules: :mod:`.flags` (the flags, their validation, the sparsifier from arguments), :mod:`.checkpoint` (the
checkpoint layout, reading and resuming), :mod:`.saver` (the one checkpoint saver, :class:`DstCheckpointSaver`),
:mod:`.outputs` (the run folder's file names and the atomic write), :mod:`.config` (YAML configs), :mod:`.launcher`
(``python -m timm_dst.run``, with :mod:`.launch`, :mod:`.patches` and :mod:`._report`). This module re-exports the
first three: it is the API that ``timm_dst.plugin`` held (a deprecated alias of this module).
"""
from .checkpoint import (
    DST_KEY,
    check_checkpoint_weights,
    dst_state,
    fill_outside_mask,
    load_plain_state_dict,
    outside_mask,
    pack_checkpoint,
    read_checkpoint,
    read_dst_state,
    restore_dst_state,
    rng_state,
    set_rng_state,
)
from .flags import (
    DISTRIBUTIONS,
    MASK_INITS,
    PRUNE_RATE_SCHEDULES,
    ParseKwargs,
    accept_plain_weights,
    add_dst_args,
    begin_training,
    create_sparsifier_from_args,
    dst_option_strings,
    dst_options,
    milestone,
    option_changes,
    sparsifier_kwargs,
    step_or_fraction,
    validate_dst_args,
)
from .saver import DstCheckpointSaver, pack_saver, packing_torch_save

__all__ = [
    'DST_KEY', 'DISTRIBUTIONS', 'MASK_INITS', 'PRUNE_RATE_SCHEDULES', 'ParseKwargs', 'add_dst_args',
    'validate_dst_args', 'sparsifier_kwargs', 'create_sparsifier_from_args', 'pack_checkpoint', 'dst_state',
    'read_dst_state', 'check_checkpoint_weights', 'restore_dst_state', 'load_plain_state_dict', 'rng_state',
    'set_rng_state', 'read_checkpoint',
    'outside_mask', 'fill_outside_mask', 'begin_training', 'accept_plain_weights', 'packing_torch_save', 'pack_saver',
    'dst_options', 'option_changes', 'dst_option_strings', 'step_or_fraction', 'milestone', 'DstCheckpointSaver',
]

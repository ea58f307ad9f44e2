"""Shared fixtures: tiny models of three kinds (MLP, timm CNN, timm ViT) and their inputs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_dst  # noqa: F401  (registers itop_mlp)

torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest and does not oversubscribe CI

# name, create_model kwargs, input shape
TINY_MODELS = {
    'mlp': ('itop_mlp', dict(in_chans=1, img_size=8), (4, 1, 8, 8)),
    'cnn': ('test_resnet', dict(), (4, 3, 32, 32)),
    'vit': ('test_vit', dict(img_size=32), (4, 3, 32, 32)),
}


# Test tiers (README, "Contributing"): every test is in the fast unit tier unless listed here. `pytest` alone runs the
# unit tier (pyproject's addopts); `pytest -m "not slow"` runs what CI runs; `-m integration`, `-m distributed` and
# `-m slow` run one tier. Keys: a test module, or a module's test name (all its parametrisations).
INTEGRATION = 'integration'  # the CLI or the launcher run in process, or any subprocess
DISTRIBUTED = 'distributed'  # two or more processes (mp.spawn, torchrun, accelerate launch)
TIERS: dict[str, str] = {
    'test_cli_errors': INTEGRATION,
    'test_reliability_launcher': INTEGRATION,
    'test_timm_run': INTEGRATION,
    'test_launcher_methods::test_lth_both_phases_under_torchrun': DISTRIBUTED,
    'test_launcher_methods': INTEGRATION,
    'test_launcher_methods::test_draw_batches_leaves_the_loader_and_random_states_as_they_were': '',
    'test_distributed': DISTRIBUTED,
    'test_timm_run::test_split_argv': '',
    'test_launcher_checks::test_gmp_with_no_flags_and_update_start': INTEGRATION,
    'test_launcher_checks::test_missing_hook_point_is_named': INTEGRATION,
    'test_timm_run::test_torchrun_two_processes': DISTRIBUTED,
    'test_cli_data::test_cnn_with_img_size_mixup_cutmix': INTEGRATION,
    'test_cli_data::test_fmnist_resnet_checkpoint_loads_in_plain_timm': INTEGRATION,
    'test_cli_data::test_image_folder_with_its_validation_split': INTEGRATION,
    'test_cli_timm_users::test_data_folder_trains_like_timm': INTEGRATION,
    'test_plugins::test_example_plugin_trains_through_the_cli': INTEGRATION,
    'test_recipes::test_generated_recipes_up_to_date': INTEGRATION,
    'test_recipes::test_recipe_runs': INTEGRATION,
    'test_reliability_state::test_cli_resume_of_a_damaged_checkpoint_is_one_line': INTEGRATION,
    'test_reliability_state::test_launcher_resume_of_damaged_checkpoints_is_one_line': INTEGRATION,
    'test_seeding::test_cli_masks_without_bias': INTEGRATION,
    'test_structure::test_cli_structure': INTEGRATION,
    'test_structure::test_launcher_structure': INTEGRATION,
    'test_zoo::test_zoo_suite': INTEGRATION,
    'test_sweep::test_sweep_end_to_end_and_resume': INTEGRATION,
    'test_zoo::test_cli_table': INTEGRATION,
    'test_zoo::test_sweep_replaces_a_grown_worker_and_skips_what_does_not_fit': INTEGRATION,
    'test_train': INTEGRATION,
    'test_train::test_bad_input': '',
    'test_train::test_bad_config_key': '',
    'test_train::test_config_keys_are_flag_names': '',
    'test_train::test_docs_cover_every_flag': '',
    'test_train::test_two_processes_agree': DISTRIBUTED,
    'test_fsdp': DISTRIBUTED,
    'test_fsdp_cli': DISTRIBUTED,
    'test_fsdp_cli::test_fsdp_refusals_are_one_line': '',
    'test_fsdp_cli::test_cli_accepts_accelerate_fsdp2_and_refuses_fsdp1': '',
    'test_fsdp_cli::test_shard_units_default_and_patterns': '',
    'test_fsdp_cli::test_resume_refuses_a_checkpoint_of_the_other_kind': '',
    'test_fsdp_cli::test_meta_build_falls_back_and_finds_what_init_leaves_unset': '',
    'test_deprecated_paths::test_package_itself_uses_no_old_path': INTEGRATION,
    'test_deprecated_paths::test_python_m_on_the_old_zoo_path_runs': INTEGRATION,
}


def tier_of(module: str, name: str) -> str:
    """The tier of test ``name`` (without parametrisation) of test module ``module``: '' (unit) or a marker name."""
    return TIERS.get(f'{module}::{name}', TIERS.get(module, ''))


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition('.')[2]
        tier = tier_of(module, item.originalname)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


def make_tiny(kind: str, seed: int = 0):
    """A tiny model of ``kind`` and a fixed batch for it."""
    name, kwargs, shape = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, 10, (shape[0],), generator=g)
    return model, x, y


@pytest.fixture(params=list(TINY_MODELS))
def tiny_kind(request) -> str:
    return request.param


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerate_state():
    """In-process CLI runs each build their own Accelerator: start and end with none."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def run_cli(argv: list[str], out, *extra) -> None:
    """``timm-dst-train`` in this process with ``argv`` and ``--output out`` plus ``extra`` flags."""
    from timm_dst.train import main
    main(list(argv) + ['--output', str(out), *map(str, extra)])
    _reset_accelerate()


def train_steps(model, opt, x, y, steps: int) -> None:
    """``steps`` plain training steps on one batch (the loop a user writes)."""
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def record_updates(sp) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record the flat drop and grow index sets of every topology update ``sp`` writes: a list that grows by one
    ``(drops, grows)`` pair (one index tensor per sparse tensor) per update."""
    calls = []
    apply = sp._writer.apply_update

    def recording(optimizer, targets, explored, counts, explored_counts, drops, grows, sharded):
        calls.append(([d.clone() for d in drops], [g.clone() for g in grows]))
        return apply(optimizer, targets, explored, counts, explored_counts, drops, grows, sharded)

    sp._writer.apply_update = recording
    return calls


def check_exact_resume(build, x, y, before: int, after: int):
    """``before`` steps, save, ``after`` more; a fresh build loaded from the save and trained ``after`` steps must
    match: masks identical, weights equal up to float nondeterminism, R_s equal. ``build()`` returns
    ``(model, optimizer, sparsifier)``. Returns both sparsifiers."""
    model, opt, sp = build()
    train_steps(model, opt, x, y, before)
    ckpt = copy.deepcopy({'model': model.state_dict(), 'opt': opt.state_dict(), 'sp': sp.state_dict()})
    train_steps(model, opt, x, y, after)
    model2, opt2, sp2 = build()
    model2.load_state_dict(ckpt['model'])
    opt2.load_state_dict(ckpt['opt'])
    sp2.load_state_dict(ckpt['sp'])
    assert sp2.step == before
    train_steps(model2, opt2, x, y, after)
    for t1, t2 in zip(sp.targets, sp2.targets):
        assert torch.equal(t1.mask, t2.mask), t1.name
    for (n, p1), p2 in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n)
    assert sp.itop_rate == sp2.itop_rate
    return sp, sp2


def check_export(model, kind: str, x) -> dict:
    """``export_state_dict(model)`` loads strictly into a fresh timm model of ``kind`` with equal outputs on ``x``."""
    exported = timm_dst.export_state_dict(model)
    assert not any(k.endswith(('_orig', '_mask')) for k in exported)
    name, kwargs, _ = TINY_MODELS[kind]
    plain = timm.create_model(name, num_classes=10, **kwargs)
    plain.load_state_dict(exported, strict=True)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
    return exported

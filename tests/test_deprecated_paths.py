"""The module paths of the flat layout (before issue #26) still work for one release: each warns once with a
``DeprecationWarning`` naming its new home, and gives the same objects, so reading, patching and unpickling through
an old name reach the real code."""
from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import timm_dst
from timm_dst._compat import MOVED

# names that code outside the package reads through the old paths (a sample of each old module's public names)
OLD_NAMES = {
    'timm_dst.sparsifier': ['Sparsifier', 'NonFiniteGradientError', 'topk_indices', 'MASK_INITS'],
    'timm_dst.reparam': ['DSTMask', 'attach_masks', 'export_state_dict', 'fold_masks', 'flat_fill_'],
    'timm_dst.plugin': ['add_dst_args', 'create_sparsifier_from_args', 'begin_training', 'pack_checkpoint',
                        'read_checkpoint', 'DST_KEY', 'pack_saver', 'sparsifier_kwargs'],
    'timm_dst._registry': ['create_sparsifier', 'register_method', '_method_infos'],
    'timm_dst._checkpoint': ['LAST', 'CheckpointError', 'OutputWriteError', 'read_checkpoint_file', 'link_atomic'],
    'timm_dst._config': ['parse_args', 'create_parser', 'read_yaml_config', 'writable_folder_problem'],
    'timm_dst._train_outputs': ['DstCheckpointSaver', 'write_json_atomic', 'SUMMARY_CSV', 'fmt_flops'],
    'timm_dst._train_eval': ['evaluate', 'DST_SUMMARY', 'RESULTS'],
    'timm_dst._fsdp': ['full', 'is_dtensor'],
    'timm_dst.methods._base': ['SparseMethod', 'DensePhase'],
    'timm_dst.sweep': ['main', 'parse_grid'],
}


def _fresh_import(name: str):
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize('old', sorted(MOVED))
def test_old_path_warns_and_names_the_new_one(old):
    module, caught = _fresh_import(old)
    new = MOVED[old][0]
    assert len(caught) == 1 and new in str(caught[0].message), [str(w.message) for w in caught]
    assert caught[0].filename == __file__  # the warning points at the importer, not at the import machinery
    if len(MOVED[old]) == 1:
        assert module is importlib.import_module(new)
        assert module.__spec__.name == new  # the real module keeps its own spec


@pytest.mark.parametrize('old', sorted(OLD_NAMES))
def test_old_names_are_the_same_objects(old):
    module, _ = _fresh_import(old)
    for name in OLD_NAMES[old]:
        owners = [importlib.import_module(t) for t in MOVED[old]]
        real = next(vars(m)[name] for m in owners if name in vars(m))
        assert getattr(module, name) is real, (old, name)


def test_patching_through_an_old_path_reaches_the_code(monkeypatch):
    plugin, _ = _fresh_import('timm_dst.plugin')
    from timm_dst.integrations import timm as dst_timm
    monkeypatch.setattr(plugin, 'begin_training', 'patched')
    assert dst_timm.begin_training == 'patched'
    checkpoint, _ = _fresh_import('timm_dst._checkpoint')  # a view of two modules: the write goes to the owner
    from timm_dst.integrations.timm import outputs
    monkeypatch.setattr(checkpoint, 'OutputWriteError', 'patched too')
    assert outputs.OutputWriteError == 'patched too'
    with pytest.raises(AttributeError, match='no attribute'):
        checkpoint.no_such_name  # noqa: B018


def test_pickles_of_the_old_layout_load():
    """A model pickled with masks before the move names timm_dst.reparam.DSTMask: it still unpickles."""
    model = nn.Sequential(nn.Linear(6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.5, update_interval=1, total_steps=4)
    data = pickle.dumps(model, protocol=0)  # module names as text lines
    old = data.replace(b'timm_dst.core.masks', b'timm_dst.reparam')
    assert old != data
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        back = pickle.loads(old)
    assert torch.equal(back[0].weight, model[0].weight)


def test_package_itself_uses_no_old_path():
    """Importing every module of the package warns about nothing (the package never goes through an alias)."""
    code = ('import warnings, pkgutil, importlib, timm_dst\n'
            'warnings.simplefilter("error", DeprecationWarning)\n'
            'for m in pkgutil.walk_packages(timm_dst.__path__, "timm_dst."):\n'
            '    if m.name not in ("timm_dst.zoo", "timm_dst.run", "timm_dst.train"):\n'
            '        importlib.import_module(m.name)\n')
    subprocess.run([sys.executable, '-c', code], check=True)


def test_python_m_on_the_old_zoo_path_runs():
    out = subprocess.run([sys.executable, '-m', 'timm_dst.zoo', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'usage' in out.stdout, out.stderr

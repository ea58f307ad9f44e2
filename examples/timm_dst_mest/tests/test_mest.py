"""The plugin's own test: installed, ``mest`` is a timm-dst method and drops by |w| + lambda |g|."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_dst


def test_registered_through_the_entry_point():
    assert 'mest' in timm_dst.list_methods()
    info = timm_dst.get_method_info('mest')
    assert info.uses_dense_grads and info.explores and info.defaults['update_interval'] == 100


def test_drops_the_lowest_weight_plus_gradient_score():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay, so the score is checked exactly
    sp = timm_dst.create_sparsifier(model, opt, method='mest', sparsity=0.5, distribution='uniform',
                                    update_interval=1, prune_rate=0.25, prune_rate_schedule='constant',
                                    mest_lambda=10.0)
    before = [t.mask.clone() for t in sp.targets]
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    grads = [g.clone() for g in sp.dense_grads()]
    score = [t.param.detach().abs() + 10.0 * g.abs() for t, g in zip(sp.targets, grads)]
    opt.step()  # one update
    for t, m, s in zip(sp.targets, before, score):
        k = round(0.25 * int(m.sum()))
        active = m.flatten().nonzero().squeeze(1)
        lowest = torch.zeros_like(m).flatten()
        lowest[active[torch.topk(s.flatten()[active], k, largest=False).indices]] = True
        lowest = lowest.view_as(m)
        assert (t.mask[m & ~lowest]).all()  # every weight outside the k lowest scores survives
        assert not (m & ~t.mask & ~lowest).any()  # what left was among them (random growth may pick some again)
        assert (m & ~t.mask).any()
    assert sp.counts == [int(m.sum()) for m in before]

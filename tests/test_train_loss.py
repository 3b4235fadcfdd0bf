import torch
import torch.nn.functional as F

from omnimini.train.loss import weighted_cross_entropy


def test_weighted_cross_entropy_matches_torch_value_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * 4).requires_grad_()
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    labels[2] = -100  # a sample with no label tokens
    weights = torch.tensor([0.5, 2.0, 1.0])[:, None]
    got = weighted_cross_entropy(logits, labels, weights)
    (g_got,) = torch.autograd.grad(got * 3, logits)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    want = (ce.view(3, 7) * weights).sum()
    (g_want,) = torch.autograd.grad(want * 3, logits)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_got, g_want, atol=1e-6)
    assert (g_got[2] == 0).all() and (g_got[0, :3] == 0).all()


def test_overwriting_the_logits_gives_the_same_loss_and_gradient():
    torch.manual_seed(1)
    base = torch.randn(2, 5, 9)
    labels = torch.randint(0, 9, (2, 5))
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    la = weighted_cross_entropy(a * 1.0, labels, torch.tensor(0.1))
    lb = weighted_cross_entropy(b * 1.0, labels, torch.tensor(0.1), overwrite_logits=True)
    (ga,) = torch.autograd.grad(la, a)
    (gb,) = torch.autograd.grad(lb, b)
    assert torch.allclose(la, lb) and torch.allclose(ga, gb)

import torch

from omnimini.config import MoEConfig
from omnimini.model.moe import MoE, switch_aux_loss


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: loop over tokens and their chosen experts, one at a time."""
    r = moe.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(r.experts.shape[1]):
            e = int(r.experts[t, j])
            gate, up = (moe.gate_up[e] @ x[t]).chunk(2)
            out[t] += r.weights[t, j] * (moe.down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def make(score="softmax", norm=True, scale=1.0, shared=0, gate=False):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_intermediate=24, score_func=score, norm_topk_prob=norm,
                    routed_scaling_factor=scale, num_shared_experts=shared, shared_expert_gate=gate)
    return MoE(32, cfg)


def test_sorted_dispatch_equals_naive_loop():
    for kw in [{}, {"score": "sigmoid", "norm": False, "scale": 2.5}, {"norm": False}]:
        moe = make(**kw).eval()
        for n in (37, 1, 3):  # sorted dispatch (training/prefill) and the few-token decode path
            x = torch.randn(n, 32)
            with torch.no_grad():
                got, _ = moe(x)
                want = naive_moe(moe, x)
            assert torch.allclose(got, want, atol=1e-5), (kw, n, (got - want).abs().max())


def test_shared_expert_with_gate_is_added():
    moe = make(shared=1, gate=True).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        got, _ = moe(x)
        want = naive_moe(moe, x) + torch.sigmoid(moe.shared_gate(x)) * moe.shared(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_touches_only_chosen_experts():
    moe = make().eval()
    calls = []
    orig = moe.expert
    moe.expert = lambda e, h: calls.append(e) or orig(e, h)
    with torch.no_grad():
        moe(torch.randn(1, 32))
    assert len(calls) == 2  # top-2 of 8: one token reads two experts' weights only


def test_gradients_reach_router_and_experts():
    moe = make().train()
    x = torch.randn(64, 32)
    y, stats = moe(x)
    (y.pow(2).mean() + stats["aux_loss"] + stats["z_loss"]).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.gate_up.grad.abs().sum() > 0 and moe.down.grad.abs().sum() > 0
    assert int(stats["load"].sum()) == 64 * 2


def test_aux_loss_is_minimal_for_uniform_routing():
    E, N = 8, 800
    uniform_probs = torch.full((N, E), 1 / E)
    uniform_choice = torch.arange(N * 2).view(N, 2) % E  # every expert gets the same share
    skewed_probs = torch.zeros(N, E)
    skewed_probs[:, 0] = 0.9
    skewed_probs[:, 1:] = 0.1 / (E - 1)
    skewed_choice = torch.zeros(N, 2, dtype=torch.long)
    skewed_choice[:, 1] = 1
    u = switch_aux_loss(uniform_probs, uniform_choice, E)
    s = switch_aux_loss(skewed_probs, skewed_choice, E)
    assert abs(float(u) - 1.0) < 1e-6
    assert float(s) > 3.0
    torch.manual_seed(0)
    rand_probs = torch.rand(N, E).softmax(-1)
    assert float(switch_aux_loss(rand_probs, rand_probs.topk(2).indices, E)) >= 1.0 - 1e-6


def test_aux_loss_free_bias_moves_toward_uniform_load():
    cfg = MoEConfig(num_experts=4, top_k=1, expert_intermediate=8, bias_update_rate=0.1)
    moe = MoE(8, cfg)
    moe.update_selection_bias(torch.tensor([10, 0, 0, 2]))
    b = moe.router.selection_bias
    assert b[0] < 0 and b[1] > 0 and b[2] > 0 and b[3] > 0


def test_grouped_expert_gradients_equal_autograd_of_naive_loop():
    for n in (64, 5):  # 5 tokens: some experts get none (their gradient must be exactly zero)
        moe = make().train()
        x = torch.randn(n, 32, requires_grad=True)
        probe = torch.randn(n, 32)
        y, _ = moe(x)
        got = torch.autograd.grad((y * probe).sum(), [x, moe.gate_up, moe.down, moe.router.weight])
        ref = torch.autograd.grad((naive_moe(moe, x) * probe).sum(), [x, moe.gate_up, moe.down, moe.router.weight])
        for g, r in zip(got, ref, strict=True):
            assert torch.allclose(g, r, atol=1e-5), (n, (g - r).abs().max())
        unused = moe.router(x).experts.flatten().bincount(minlength=8) == 0
        assert n == 64 or unused.any()
        assert (got[1][unused] == 0).all() and (got[2][unused] == 0).all()

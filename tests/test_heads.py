"""Recipe heads: MLP projector/expander/predictor layouts and masked clip pooling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from musicssl.recipes.heads import MLPHead, clip_vector


def kinds(head: MLPHead) -> list[type]:
    return [type(m) for m in head.net]


@pytest.mark.parametrize("norm, norm_type", [("bn", nn.BatchNorm1d), ("ln", nn.LayerNorm), (None, None)])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_layout_and_shapes(norm, norm_type, n_layers):
    head = MLPHead(32, 64, 16, n_layers=n_layers, norm=norm)
    hidden = [nn.Linear, norm_type, nn.ReLU] if norm else [nn.Linear, nn.ReLU]
    assert kinds(head) == hidden * (n_layers - 1) + [nn.Linear]
    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip([32] + [64] * (n_layers - 1), [64] * (n_layers - 1) + [16]))
    # A norm after a Linear replaces its bias; the output Linear keeps one.
    assert [m.bias is not None for m in linears] == [norm is None] * (n_layers - 1) + [True]
    assert head(torch.randn(5, 32)).shape == (5, 16)


def test_frame_inputs_fold_leading_dims():
    head = MLPHead(8, 16, 4, norm="bn").eval()
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(head(x), head(x.reshape(21, 8)).view(3, 7, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        head(torch.randn(3, 9))


def test_last_norm():
    bn = MLPHead(8, 16, 4, norm="bn", last_norm=True).train()
    assert isinstance(bn.net[-1], nn.BatchNorm1d) and not bn.net[-1].affine and bn.net[-2].bias is None
    z = bn(torch.randn(64, 8))
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    ln = MLPHead(8, 16, 4, norm="ln", last_norm=True)
    z = ln(torch.randn(6, 8))
    torch.testing.assert_close(z.mean(-1), torch.zeros(6), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="last_norm"):
        MLPHead(8, 16, 4, norm=None, last_norm=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        MLPHead(8, 16, 4, norm="gn")
    with pytest.raises(ValueError, match="n_layers"):
        MLPHead(8, 16, 4, n_layers=0)


@pytest.mark.parametrize("norm", ["bn", "ln", None])
def test_gradients_flow(norm):
    torch.manual_seed(0)
    head = MLPHead(8, 16, 4, n_layers=3, norm=norm, last_norm=norm is not None).train()
    x = torch.randn(10, 8, requires_grad=True)
    head(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_paper_sizes_build_small_versions_of_the_same_layout():
    """BYOL projector 4096 -> 256 with BN; VICReg expander 3 x 8192; scaled down by 64 here."""
    byol = MLPHead(32, 4096 // 64, 256 // 64)
    assert kinds(byol) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    vicreg = MLPHead(32, 8192 // 64, 8192 // 64, n_layers=3)
    assert kinds(vicreg) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]


def test_clip_vector_ignores_padding():
    frames = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 2, 1])
    out = clip_vector(frames, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i], frames[i, :n].mean(0))
    garbage = frames.clone()
    garbage[1, 2:] = 1e6
    garbage[2, 1:] = float("nan")
    torch.testing.assert_close(clip_vector(garbage, lengths), out)
    torch.testing.assert_close(clip_vector(frames), frames.mean(1))


def test_masked_pool_gives_the_same_with_and_without_gradients():
    """With gradients it pools in one masked pass (item by item, each slice took a full-size
    gradient: quadratic in the batch); without, over views. Both agree, NaN past lengths included."""
    from musicssl.models.base import masked_pool

    frames = torch.randn(4, 6, 2, 3)
    frames[1, 2:] = float("nan")
    lengths = torch.tensor([6, 2, 0, 1])
    for how in ("mean", "max"):
        grad = masked_pool(frames.clone().requires_grad_(), lengths, how)
        torch.testing.assert_close(grad.detach(), masked_pool(frames, lengths, how))
        assert (grad[2] == 0).all() and grad.isfinite().all()
    torch.testing.assert_close(clip_vector(frames[:, :, 0], lengths.float()), clip_vector(frames[:, :, 0], lengths))


def test_clip_vector_edge_cases_and_gradients():
    frames = torch.randn(2, 3, 4, requires_grad=True)
    out = clip_vector(frames, torch.tensor([0, 3]))
    assert (out[0] == 0).all()
    out.sum().backward()
    assert (frames.grad[0] == 0).all() and torch.allclose(frames.grad[1], torch.full((3, 4), 1 / 3))
    with pytest.raises(ValueError, match="lengths"):
        clip_vector(torch.randn(2, 3, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="frames"):
        clip_vector(torch.randn(2, 3))

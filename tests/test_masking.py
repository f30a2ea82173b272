"""musicssl.recipes.masking: counts, disjointness, ranges, determinism per seed, and the DDP
property (a batch built at once equals its halves built apart), on time-major token grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musicssl.recipes.masking import (
    apply_masks,
    collate_masks,
    jepa_mask_counts,
    jepa_masks,
    mae_masks,
    random_mask,
    seed_generator,
)

GRID = (63, 5)  # 10 s of 80-band log-mel in 16x16 patches


def draws(gen: torch.Generator, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 2**31, (n,), generator=gen)


# seed_generator -----------------------------------------------------------------------------------


def test_seed_generator_deterministic_and_distinct() -> None:
    assert torch.equal(draws(seed_generator(3, 17)), draws(seed_generator(3, 17)))
    assert torch.equal(draws(seed_generator(3, 17)), draws(seed_generator(np.int64(3), torch.tensor(17))))
    others = [(3, 18), (17, 3), (4, 17), (3,), (3, 17, 0), (-3, 17)]
    for key in others:
        assert not torch.equal(draws(seed_generator(3, 17)), draws(seed_generator(*key))), key
    with pytest.raises(TypeError):
        seed_generator(1.5)


# random / MAE masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,ratio", [(315, 0.8), (200, 0.75), (10, 0.25), (7, 0.0), (7, 1.0), (1, 0.5)])
def test_random_mask_count(n: int, ratio: float) -> None:
    m = random_mask(n, ratio, seed_generator(0))
    assert m.shape == (n,) and m.dtype == torch.bool
    assert int(m.sum()) == round(ratio * n)
    assert torch.equal(m, random_mask(n, ratio, seed_generator(0)))


def test_random_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        random_mask(10, 1.2, seed_generator(0))
    with pytest.raises(ValueError):
        random_mask(0, 0.5, seed_generator(0))


def test_mae_masks_equal_counts_and_per_example_generators() -> None:
    m = mae_masks(6, 200, 0.8, seed_generator(1))
    assert m.shape == (6, 200) and m.dtype == torch.bool
    assert (m.sum(dim=1) == 160).all()
    assert len({tuple(row.tolist()) for row in m}) == 6  # rows differ
    # One generator per example: the batch is the concatenation of its parts.
    gens = lambda idx: [seed_generator(7, i) for i in idx]  # noqa: E731
    whole = mae_masks(6, 200, 0.8, gens(range(6)))
    parts = torch.cat([mae_masks(2, 200, 0.8, gens(range(2))), mae_masks(4, 200, 0.8, gens(range(2, 6)))])
    assert torch.equal(whole, parts)
    with pytest.raises(ValueError):
        mae_masks(3, 200, 0.8, gens(range(2)))


# apply_masks --------------------------------------------------------------------------------------


def test_apply_masks_gathers_rows() -> None:
    x = torch.randn(3, 10, 4)
    idx = torch.tensor([[0, 9, 3], [5, 5, 1], [2, 7, 8]])
    out = apply_masks(x, idx)
    assert out.shape == (3, 3, 4)
    for b in range(3):
        for k in range(3):
            assert torch.equal(out[b, k], x[b, idx[b, k]])
    x.requires_grad_()
    apply_masks(x, idx).sum().backward()
    assert x.grad[1, 5].eq(2).all() and x.grad[0, 1].eq(0).all()  # gradient lands on the picked rows
    with pytest.raises(ValueError):
        apply_masks(x, idx[:2])
    with pytest.raises(ValueError):
        apply_masks(x[0], idx[0])


# JEPA masks -----------------------------------------------------------------------------------------


def check_example(context: torch.Tensor, targets: list[torch.Tensor] | torch.Tensor, n_time: int, n_freq: int) -> None:
    n = n_time * n_freq
    assert context.dtype == torch.long
    assert context.numel() > 0 and 0 <= int(context.min()) and int(context.max()) < n
    assert torch.equal(context, context.unique())  # sorted, no repeats
    seen = set(context.tolist())
    for t in targets:
        assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < n
        assert torch.equal(t, t.unique())
        assert not seen & set(t.tolist()), "context and target overlap"


def block_shape(t: torch.Tensor, n_freq: int) -> tuple[int, int, int, int]:
    """(first time, time length, first row, rows) of a target's bounding box; asserts it is a block
    filled in grid order (whole columns, then a last column cut short)."""
    times, rows = (t // n_freq).tolist(), (t % n_freq).tolist()
    t0, t1, f0, f1 = min(times), max(times), min(rows), max(rows)
    h = f1 - f0 + 1
    full = [tt * n_freq + f for tt in range(t0, t1 + 1) for f in range(f0, f1 + 1)]
    assert t.tolist() == full[: t.numel()]
    assert t.numel() > (t1 - t0) * h  # only the last column may be short
    return t0, t1 - t0 + 1, f0, h


def test_jepa_defaults_on_ten_second_grid() -> None:
    assert jepa_mask_counts(*GRID) == (142, 32)
    assert jepa_mask_counts(40, 5) == (90, 20)  # the JEPA recipe's 6.39 s crops
    for seed in range(20):
        context, targets = jepa_masks(*GRID, seed_generator(seed))
        check_example(context, targets, *GRID)
        assert len(targets) == 4 and all(t.numel() == 32 for t in targets)
        assert context.numel() >= 142
        for t in targets:
            _, length, _, height = block_shape(t, GRID[1])
            assert 2 <= height <= 5 and length == -(-32 // height)
        times = context // GRID[1]
        assert int(times.max() - times.min()) + 1 <= 63


def test_jepa_masks_deterministic_per_seed() -> None:
    a = jepa_masks(*GRID, seed_generator(0, 5))
    b = jepa_masks(*GRID, seed_generator(0, 5))
    c = jepa_masks(*GRID, seed_generator(0, 6))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert not (torch.equal(a[0], c[0]) and all(torch.equal(x, y) for x, y in zip(a[1], c[1])))


def test_full_band_time_targets_and_whole_grid_context() -> None:
    n_time, n_freq = 30, 4
    for seed in range(10):
        context, targets = jepa_masks(
            n_time, n_freq, seed_generator(seed), n_targets=3, target_size=8, target_freq=(1.0, 1.0),
            context_keep=(1.0, 1.0),
        )
        for t in targets:
            assert block_shape(t, n_freq)[3] == n_freq and t.numel() == 8  # two whole time columns
        covered = set(torch.cat(targets).tolist())
        assert set(context.tolist()) == set(range(n_time * n_freq)) - covered


def test_context_is_a_time_block() -> None:
    for seed in range(10):
        context, targets = jepa_masks(50, 3, seed_generator(seed), context_keep=(10, 20), target_size=3)
        times = context // 3
        assert int(times.max() - times.min()) + 1 <= 20
        lo, hi = int(times.min()), int(times.max())
        block = set(range(lo * 3, (hi + 1) * 3))
        assert set(context.tolist()) == block - set(torch.cat(targets).tolist())


def test_min_keep_above_the_guarantee_resamples() -> None:
    counts = jepa_mask_counts(*GRID, min_keep=180)
    assert counts == (180, 32)
    for seed in range(10):
        context, _ = jepa_masks(*GRID, seed_generator(seed), min_keep=180)
        assert context.numel() >= 180
    c, t = collate_masks(*GRID, [(0, i) for i in range(4)], min_keep=180)
    assert c.shape == (4, 180) and t.shape == (4, 4, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_size=0.0),
        dict(target_size=1.5),
        dict(target_size=400),
        dict(target_freq=(1.0, 0.4)),
        dict(target_freq=(0, 3)),
        dict(target_freq=(1, 6)),
        dict(target_size=100, target_freq=(1, 1)),  # a 1-row strip of 100 is longer than 63 patches
        dict(context_keep=(0.9, 0.5)),
        dict(n_targets=0),
        dict(min_keep=0),
        dict(min_keep=400),
        dict(target_size=True),
    ],
)
def test_jepa_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        jepa_masks(*GRID, seed_generator(0), **kwargs)
    with pytest.raises(ValueError):
        jepa_mask_counts(*GRID, **kwargs)


def test_impossible_context_raises() -> None:
    # Four targets of the whole grid leave no context, ever: said before any draw.
    with pytest.raises(ValueError, match="can cover all but 0 of the 3 tokens"):
        jepa_masks(4, 1, seed_generator(0), target_size=4, target_freq=(1, 1))
    with pytest.raises(ValueError, match="no draw left 1 context tokens"):  # asked for: drawn, and failed
        jepa_masks(4, 1, seed_generator(0), target_size=4, target_freq=(1, 1), min_keep=1)


def test_targets_that_would_leave_a_sliver_of_context_are_refused() -> None:
    """Eight 10 % targets on the JEPA recipe's 40 x 5 grid leave 10 of 170 tokens: every context
    cut to 10 tokens, 5 % of the grid. Under 1/10 of the grid is refused up front."""
    assert jepa_mask_counts(40, 5, n_targets=7) == (30, 20)
    with pytest.raises(ValueError, match="8 targets of 20 tokens can cover all but 10 of the 170 tokens"):
        jepa_mask_counts(40, 5, n_targets=8)


# collate_masks ----------------------------------------------------------------------------------------


def test_collate_shapes_and_per_example_masks() -> None:
    keys = [(0, i) for i in range(8)]
    context, targets = collate_masks(*GRID, keys)
    assert context.shape == (8, 142) and targets.shape == (8, 4, 32)
    assert context.dtype == targets.dtype == torch.long
    for b in range(8):
        check_example(context[b], targets[b], *GRID)
        # each row is a subset of what jepa_masks drew for that key
        full_context, full_targets = jepa_masks(*GRID, seed_generator(*keys[b]))
        assert set(context[b].tolist()) <= set(full_context.tolist())
        assert torch.equal(targets[b], torch.stack(full_targets))
    assert len({tuple(r.tolist()) for r in context}) == 8


def test_collate_is_deterministic_and_equal_to_its_halves() -> None:
    keys = [(1234, i) for i in (5, 9, 2, 40, 41, 7, 300)]
    whole = collate_masks(*GRID, keys)
    again = collate_masks(*GRID, keys)
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    first, second = collate_masks(*GRID, keys[:3]), collate_masks(*GRID, keys[3:])  # two DDP ranks
    assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
    assert torch.equal(whole[1], torch.cat([first[1], second[1]]))
    singles = [collate_masks(*GRID, [k]) for k in keys]
    assert torch.equal(whole[0], torch.cat([s[0] for s in singles]))


def test_collate_int_keys_and_empty() -> None:
    a = collate_masks(10, 2, [3, 4], n_targets=2)
    b = collate_masks(10, 2, [(3,), (4,)], n_targets=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError):
        collate_masks(10, 2, [])


def test_collate_feeds_apply_masks() -> None:
    B, (n_time, n_freq) = 3, GRID
    x = torch.arange(n_time * n_freq, dtype=torch.float32)[None, :, None].expand(B, -1, 2)
    context, targets = collate_masks(n_time, n_freq, [(0, i) for i in range(B)])
    assert torch.equal(apply_masks(x, context)[..., 0].long(), context)
    flat = targets.reshape(B, -1)
    assert torch.equal(apply_masks(x, flat)[..., 0].long(), flat)


@settings(max_examples=60, deadline=None)
@given(
    n_time=st.integers(8, 100),
    n_freq=st.integers(1, 8),
    n_targets=st.integers(1, 4),
    full_band=st.booleans(),
    seed=st.integers(-(2**40), 2**40),
    split=st.integers(1, 3),
)
def test_property_random_grids(
    n_time: int, n_freq: int, n_targets: int, full_band: bool, seed: int, split: int
) -> None:
    kwargs = dict(n_targets=n_targets, target_freq=(1.0, 1.0) if full_band else (0.4, 1.0))
    n_context, n_target = jepa_mask_counts(n_time, n_freq, **kwargs)
    keys = [(seed, i) for i in range(4)]
    context, targets = collate_masks(n_time, n_freq, keys, **kwargs)
    assert context.shape == (4, n_context) and targets.shape == (4, n_targets, n_target)
    for b in range(4):
        check_example(context[b], targets[b], n_time, n_freq)
        for t in targets[b]:
            _, _, _, height = block_shape(t, n_freq)
            if full_band:
                assert height == min(n_freq, n_target)
    head = collate_masks(n_time, n_freq, keys[:split], **kwargs)
    tail = collate_masks(n_time, n_freq, keys[split:], **kwargs)  # another rank's share
    assert torch.equal(context, torch.cat([head[0], tail[0]]))
    assert torch.equal(targets, torch.cat([head[1], tail[1]]))

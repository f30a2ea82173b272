"""Token masks, made on the data side (in the collator) and handed to the model as indices.

Tokens index a grid of n_time x n_freq patches time-major, index = t * n_freq + f, as
`SpecViT.patchify` lays them out. All randomness comes from explicit `torch.Generator`s; collators
seed one per example from integers (`seed_generator(run_seed, index)`), so a batch is the same
whether it is built on one process or split across DDP ranks, and the same again on resume.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import torch

# A target or context extent: an int counts patches (or tokens), a float is a fraction of the axis.
Extent = int | float


def seed_generator(*ints: int) -> torch.Generator:
    """A CPU generator seeded from a hash of `ints` (e.g. run seed, sample index): equal ints give
    equal streams in any process, and nearby tuples give unrelated ones."""
    data = b"".join(operator.index(i).to_bytes(16, "little", signed=True) for i in ints)
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
    return torch.Generator().manual_seed(seed)


def random_mask(n_tokens: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(n_tokens,) bool, True = masked, with exactly round(ratio * n_tokens) True at random places."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    mask[torch.randperm(n_tokens, generator=gen)[: round(ratio * n_tokens)]] = True
    return mask


def mae_masks(
    batch_size: int, n_tokens: int, ratio: float, gen: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """MAE random masking (He et al., CVPR 2022): (batch_size, n_tokens) bool, True = masked, the
    same count round(ratio * n_tokens) in every row so the visible tokens stack. `gen` is one
    generator drawn row after row, or one per row (per-example seeds: DDP-invariant batches)."""
    gens = [gen] * batch_size if isinstance(gen, torch.Generator) else list(gen)
    if len(gens) != batch_size:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch_size}")
    return torch.stack([random_mask(n_tokens, ratio, g) for g in gens])


def apply_masks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep the tokens at `idx`: x (B, N, D), idx (B, K) int64 in [0, N) -> (B, K, D), row b of
    the result being x[b, idx[b]] in the order given (I-JEPA's `apply_masks`, by one gather)."""
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    if idx.ndim != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be (B, K) with B = {x.shape[0]}, got shape {tuple(idx.shape)}")
    return torch.gather(x, 1, idx.to(device=x.device, dtype=torch.long)[..., None].expand(-1, -1, x.shape[-1]))


# JEPA multi-block masks -------------------------------------------------------------------------
#
# Defaults, for the 10 s x 80-mel grid of 16x16 patches (n_time 63, n_freq 5, 315 tokens; the same
# fractions hold for the JEPA recipe's 40 x 5 crops):
# - 4 targets (I-JEPA's count), each exactly 10 % of the grid (32 of 315 tokens). I-JEPA's 15-20 %
#   blocks on a 14 x 14 image would cover 60-80 % of a grid with only 5 frequency rows, leaving a
#   thin context; Riou et al. (2024) also found big structured targets weaker on spectrograms.
# - target height 40-100 % of the frequency rows (2-5 of 5): from a 2-row x 16-patch (2.6 s)
#   strip of one register to a full-band time band of 7 patches (1.1 s), the band masking of
#   audio JEPA variants. A target is the first `size` tokens, in grid order, of the
#   height x ceil(size / height) rectangle, so its last time column may be cut short: every target
#   then holds the same count by construction.
# - context: one full-band time block of 85-100 % of the frames (I-JEPA's context scale), minus
#   every target. Each example keeps exactly `min_keep` context tokens, by default the count that
#   four disjoint targets inside the shortest block still leave (270 - 4 * 32 = 142, 45 % of the
#   grid). A draw has 188 on average, so the cut is a light extra random masking of the context;
#   I-JEPA's cut to the batch minimum comes to about the same at batch sizes of a few hundred.
#   Counts that depend only on the grid and the settings, never on the batch, are what make a
#   batch built at once equal to its halves built on two ranks.


# Without min_keep, the context every draw must leave is at least 1/10 of the grid (I-JEPA keeps 10
# of 196 patches, 1/20, at least; a thinner context leaves the predictor nothing to go on).
_MIN_CONTEXT_SHARE = 10


def _extent(v: Extent, n: int, name: str) -> int:
    """An int counts units, in [1, n]; a float is a fraction of n in (0, 1], rounded, at least 1."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{name} must be an int (patches) or a float (fraction), got {v!r}")
    if isinstance(v, float):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{name} as a fraction must be in (0, 1], got {v}")
        return max(1, round(v * n))
    if not 1 <= v <= n:
        raise ValueError(f"{name} must be in [1, {n}] patches, got {v}")
    return v


def _span(r: tuple[Extent, Extent], n: int, name: str) -> tuple[int, int]:
    lo, hi = _extent(r[0], n, name), _extent(r[1], n, name)
    if lo > hi:
        raise ValueError(f"{name} range is empty: {r} -> [{lo}, {hi}] of {n}")
    return lo, hi


def _geometry(
    n_time: int, n_freq: int, n_targets: int, target_size: Extent, target_freq: tuple[Extent, Extent],
    context_keep: tuple[Extent, Extent], min_keep: int | None,
) -> tuple[int, tuple[int, int], tuple[int, int], int]:
    """Validated integers: tokens per target, its height range, the context time range, min_keep."""
    if n_time < 1 or n_freq < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {n_time} x {n_freq}")
    if n_targets < 1:
        raise ValueError(f"n_targets must be positive, got {n_targets}")
    size = _extent(target_size, n_time * n_freq, "target_size")
    h_lo, h_hi = _span(target_freq, n_freq, "target_freq")
    heights = (min(h_lo, size), min(h_hi, size))  # a target is no taller than its token count
    if -(-size // heights[0]) > n_time:
        raise ValueError(f"a target of {size} tokens {heights[0]} rows high does not fit {n_time} time patches")
    ctx = _span(context_keep, n_time, "context_keep")
    guaranteed = ctx[0] * n_freq - n_targets * size
    if min_keep is None:
        floor = -(-n_time * n_freq // _MIN_CONTEXT_SHARE)  # the context the predictor needs to say anything
        if guaranteed < floor:
            raise ValueError(
                f"{n_targets} targets of {size} tokens can cover all but {max(guaranteed, 0)} of the {ctx[0] * n_freq} "
                f"tokens of the shortest context block ({n_time} x {n_freq} grid), so every context would be cut "
                f"to that: use fewer targets (n_targets) or smaller ones, or give min_keep"
            )
        min_keep = guaranteed
    elif not 1 <= min_keep <= ctx[1] * n_freq:
        raise ValueError(f"min_keep must be in [1, {ctx[1] * n_freq}], got {min_keep}")
    return size, heights, ctx, min_keep


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform on [lo, hi], inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _target_block(n_time: int, n_freq: int, size: int, heights: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    h = _randint(*heights, gen)
    w = -(-size // h)
    t0, f0 = _randint(0, n_time - w, gen), _randint(0, n_freq - h, gen)
    t, f = torch.meshgrid(torch.arange(t0, t0 + w), torch.arange(f0, f0 + h), indexing="ij")
    return (t * n_freq + f).flatten()[:size]  # time-major, so the cut falls in the last column


_MAX_TRIES = 1000


def jepa_masks(
    n_time: int,
    n_freq: int,
    gen: torch.Generator,
    n_targets: int = 4,
    target_size: Extent = 0.1,
    target_freq: tuple[Extent, Extent] = (0.4, 1.0),
    context_keep: tuple[Extent, Extent] = (0.85, 1.0),
    min_keep: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """I-JEPA multi-block masks (Assran et al., CVPR 2023, sec. 3) on a time-frequency token grid.

    Targets: `n_targets` blocks of exactly `target_size` tokens (int, or float fraction of the grid),
    each `target_freq` rows high (a range, ints or fractions of n_freq; n_freq gives a full-band time
    band; capped at target_size) and as long in time as that size needs, placed uniformly; targets
    may overlap each other.
    Context: a full-band time block of `context_keep` (a range, ints or fractions of n_time) placed
    uniformly, minus every target. Draws are repeated until the context holds at least `min_keep`
    tokens (default: a count every draw reaches; see the module notes for the defaults' reasons).

    Returns context_idx (Nc,) int64 and target_idx, a list of n_targets (target_size,) int64, each
    sorted; Nc >= min_keep varies per draw (`collate_masks` cuts it to min_keep).
    """
    geometry = _geometry(n_time, n_freq, n_targets, target_size, target_freq, context_keep, min_keep)
    size, heights, ctx, min_keep = geometry
    for _ in range(_MAX_TRIES):
        targets = [_target_block(n_time, n_freq, size, heights, gen).sort().values for _ in range(n_targets)]
        w = _randint(*ctx, gen)
        t0 = _randint(0, n_time - w, gen)
        keep = torch.zeros(n_time * n_freq, dtype=torch.bool)
        keep[t0 * n_freq : (t0 + w) * n_freq] = True
        keep[torch.cat(targets)] = False
        if int(keep.sum()) >= min_keep:
            return keep.nonzero().squeeze(1), targets
    raise ValueError(
        f"no draw left {min_keep} context tokens in {_MAX_TRIES} tries on a {n_time} x {n_freq} grid; "
        "lower min_keep or use fewer or smaller targets"
    )


def jepa_mask_counts(
    n_time: int,
    n_freq: int,
    n_targets: int = 4,
    target_size: Extent = 0.1,
    target_freq: tuple[Extent, Extent] = (0.4, 1.0),
    context_keep: tuple[Extent, Extent] = (0.85, 1.0),
    min_keep: int | None = None,
) -> tuple[int, int]:
    """(Nc, Nt): the context and per-target token counts `collate_masks` returns for these settings."""
    size, _, _, min_keep = _geometry(n_time, n_freq, n_targets, target_size, target_freq, context_keep, min_keep)
    return min_keep, size


def collate_masks(
    n_time: int, n_freq: int, keys: Sequence[int | Sequence[int]], **mask_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `jepa_masks`, one per key, each drawn from `seed_generator(*key)` (an int key is a
    1-tuple), e.g. keys [(run_seed, index), ...]: the same key always gives the same masks, so include
    the epoch or a draw counter in it if an example should get fresh masks each time it is seen.

    Every context is cut to exactly Nc = min_keep tokens by a random subset drawn from the same
    generator (I-JEPA keeps the first tokens of each instead, which in a time-major grid drops the
    end of the clip); targets already hold Nt tokens each. Nc and Nt depend only on the grid and
    `mask_kwargs` (see `jepa_mask_counts`), not on the other examples, so the batch equals the
    concatenation of its parts built separately.

    Returns context (B, Nc) and targets (B, n_targets, Nt), int64, every row sorted; the I-JEPA list
    of per-target (B, Nt) index tensors is `targets.unbind(1)`.
    """
    if len(keys) == 0:
        raise ValueError("keys is empty: one key per example")
    n_context, _ = jepa_mask_counts(n_time, n_freq, **mask_kwargs)
    contexts, targets = [], []
    for key in keys:
        gen = seed_generator(*(key if isinstance(key, Sequence) else (key,)))
        context, blocks = jepa_masks(n_time, n_freq, gen, **mask_kwargs)
        pick = torch.randperm(context.numel(), generator=gen)[:n_context]
        contexts.append(context[pick].sort().values)
        targets.append(torch.stack(blocks))
    return torch.stack(contexts), torch.stack(targets)

"""Triton knn_topk / soft_neighbors (split + merge kernels) against the torch reference.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
the interpreted cases stay small (bank <= 4096 rows). Top-K checks are robust to ties:
values match, the recomputed scores of the returned indices equal the returned values, and
every returned value is >= the reference K-th value; exact index equality is asserted only
where the expected order is forced (duplicated rows, NaN / excluded rows).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, requires_cuda
from sm90 import compile_for_sm90

import snclr.ops as ops
from snclr import reference
from snclr.kernels import knn_topk as kernels

ATOL, RTOL = TOLERANCES[torch.float32]

# (B, N, D, K): odd batch sizes, banks that are not a multiple of the 64-row tile.
SEARCH_SHAPES = [
    (1, 1, 16, 1),  # a single bank row
    (7, 5, 16, 3),
    (33, 100, 64, 16),
    (7, 333, 96, 3),
    (33, 333, 64, 1),  # K = 1 running-argmax path
    (7, 300, 64, 64),  # the largest K
    (1, 4096, 16, 16),  # the largest interpreted bank
]


def _ids(shapes):
    return ["B{}-N{}-D{}-K{}".format(*s) for s in shapes]


def assert_topk_consistent(query, bank, k, values, indices, exclude=None):
    """Tie-robust comparison of a top-k result with the reference."""
    ref_values, _ = reference.knn_topk(query, bank, k, exclude=exclude)
    assert values.shape == indices.shape == (query.shape[0], k)
    assert indices.dtype == torch.int64 and values.dtype == ref_values.dtype
    assert int(indices.min()) >= 0 and int(indices.max()) < bank.shape[0]
    assert all(len(set(row)) == k for row in indices.tolist()), "repeated index in a row"
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)
    rescored = torch.einsum("bd,bkd->bk", query.double(), bank.double()[indices]).float()
    finite = values.isfinite()
    torch.testing.assert_close(values[finite], rescored[finite], atol=ATOL, rtol=RTOL)
    kth = ref_values[:, -1:]
    assert bool((values >= kth - ATOL - RTOL * kth.abs()).all())


def _split_and_merge(query, bank, k, *, group_rows=64, sub_rows=16, exclude=None, **options):
    """The two kernels directly, with the group and subgroup sizes, split count and tiles
    given."""
    keys, sub_maxima = kernels.knn_topk_split(query, bank, k, group_rows=group_rows,
                                              sub_rows=sub_rows, exclude=exclude, **options)
    indices, values, _ = kernels.knn_topk_merge(keys, sub_maxima, query, bank, k,
                                                sub_rows=sub_rows, exclude=exclude,
                                                values_dtype=torch.float32)
    return values, indices


@pytest.mark.parametrize("shape", SEARCH_SHAPES, ids=_ids(SEARCH_SHAPES))
def test_knn_topk_matches_reference(shape):
    batch, rows, dim, k = shape
    query, bank = torch.randn(batch, dim), torch.randn(rows, dim)
    values, indices = ops.knn_topk(query, bank, k, backend="triton")
    assert_topk_consistent(query, bank, k, values, indices)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_split_counts_and_small_tiles(num_splits, k):
    query, bank = torch.randn(33, 64), torch.randn(333, 64)
    keys, sub_maxima = kernels.knn_topk_split(
        query, bank, k, group_rows=64, sub_rows=16, num_splits=num_splits, block_b=16, block_d=32
    )
    slots = kernels.split_layout(33, 333, k, 64, num_splits).stored_slots
    assert keys.shape == (33, num_splits, k) and sub_maxima.shape == (33, num_splits, slots, 4)
    indices, values, positiveness = kernels.knn_topk_merge(
        keys, sub_maxima, query, bank, k, sub_rows=16, values_dtype=torch.float32
    )
    assert positiveness is None
    assert_topk_consistent(query, bank, k, values, indices)


def test_duplicated_rows_tie_to_the_smaller_index():
    # Small integers: every score is exact, so equal rows score exactly equal whatever the
    # summation order of the tile (random floats would differ in the last bit).
    base = torch.randint(-3, 4, (40, 32)).float()
    # Every row appears three times, spread across tiles and splits.
    bank = torch.cat([base, base, base])[torch.randperm(120)]
    query = torch.randint(-3, 4, (7, 32)).float()
    for num_splits in (1, 3):
        indices, values = _split_and_merge(query, bank, 9, num_splits=num_splits)[::-1]
        ref_values, ref_indices = reference.knn_topk(query, bank, 9)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


def test_k_equals_n_returns_every_row_sorted():
    query, bank = torch.randn(7, 16), torch.randn(12, 16)
    values, indices = ops.knn_topk(query, bank, 12, backend="triton")
    assert torch.equal(indices.sort(dim=1).values, torch.arange(12).expand(7, 12))
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    assert_topk_consistent(query, bank, 12, values, indices)


def test_very_negative_scores():
    query = torch.rand(7, 16) + 0.1
    bank = -(torch.rand(200, 16) + 0.1) * 1e3
    values, indices = ops.knn_topk(query, bank, 5, backend="triton")
    ref_values, ref_indices = reference.knn_topk(query, bank, 5)
    assert bool((values < -1e2).all())
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


def test_nan_rows_never_win():
    query, bank = torch.randn(7, 16), torch.randn(150, 16)
    bank[::3] = float("nan")
    values, indices = ops.knn_topk(query, bank, 10, backend="triton")
    assert not bool((indices % 3 == 0).any())
    assert_topk_consistent(query, bank, 10, values, indices)


def test_nan_rows_fill_the_tail_as_minus_inf_like_the_reference():
    query, bank = torch.randn(7, 16), torch.full((70, 16), float("nan"))
    bank[[5, 40, 66]] = torch.randn(3, 16)
    values, indices = ops.knn_topk(query, bank, 6, backend="triton")
    ref_values, ref_indices = reference.knn_topk(query, bank, 6)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(indices[:, 3:], torch.tensor([0, 1, 2]).expand(7, 3))
    assert bool((values[:, 3:] == float("-inf")).all())
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


def test_exclusion_with_padding():
    query, bank = torch.randn(7, 32), torch.randn(333, 32)
    _, best = reference.knn_topk(query, bank, 4)
    # Exclude each query's two best rows, with -1 padding and a repeated entry.
    exclude = torch.cat([best[:, :2], torch.full((7, 2), -1), best[:, :1]], dim=1)
    values, indices = ops.knn_topk(query, bank, 4, exclude=exclude, backend="triton")
    assert not bool((indices.unsqueeze(2) == best[:, None, :2]).any())
    assert torch.equal(indices[:, :2], best[:, 2:])
    assert_topk_consistent(query, bank, 4, values, indices, exclude=exclude)


def test_exclusion_leaving_fewer_than_k_rows():
    query, bank = torch.randn(3, 16), torch.randn(6, 16)
    exclude = torch.tensor([[0, 1, 2, 3], [5, -1, -1, -1], [4, 2, 0, -1]])
    values, indices = ops.knn_topk(query, bank, 5, exclude=exclude, backend="triton")
    ref_values, ref_indices = reference.knn_topk(query, bank, 5, exclude=exclude)
    assert torch.equal(indices, ref_indices)
    assert bool((values[0, 2:] == float("-inf")).all())
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_many_equal_scores_straddling_the_threshold(num_splits):
    # Scores in {-1, 0, 1}: hundreds of rows tie with the K-th, in every tile and split;
    # only the smaller indices may win, exactly as the reference's stable sort.
    query = torch.ones(9, 16)
    bank = torch.zeros(700, 16)
    bank[:, 0] = torch.randint(-1, 2, (700,)).float()
    values, indices = _split_and_merge(query, bank, 16, num_splits=num_splits)
    ref_values, ref_indices = reference.knn_topk(query, bank, 16)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)


def test_all_nan_rows_report_minus_inf_at_the_smallest_indices():
    query, bank = torch.randn(5, 16), torch.randn(300, 16)
    query[[1, 3]] = float("nan")
    values, indices = ops.knn_topk(query, bank, 7, backend="triton")
    ref_values, ref_indices = reference.knn_topk(query, bank, 7)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(indices[1], torch.arange(7))
    assert bool((values[[1, 3]] == float("-inf")).all())
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


def test_exclusion_of_rows_at_the_threshold():
    # Exclude the K-th and (K+1)-th best rows of each query and a row tied with the K-th:
    # the next rows must move up, in order.
    query = torch.randint(-2, 3, (6, 32)).float()
    bank = torch.randint(-2, 3, (500, 32)).float()
    _, order = reference.knn_topk(query, bank, 12)
    exclude = order[:, 7:9]
    for num_splits in (1, 4):
        values, indices = ops.knn_topk(query, bank, 8, exclude=exclude, backend="triton")
        ref_values, ref_indices = reference.knn_topk(query, bank, 8, exclude=exclude)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)
        v, i = _split_and_merge(query, bank, 8, exclude=exclude, num_splits=num_splits,
                                )
        assert torch.equal(i, ref_indices)


@pytest.mark.parametrize("rows", [10, 70, 130])
def test_fewer_rows_than_k_times_splits(rows):
    # Some splits hold fewer than K rows, or none at all.
    query, bank = torch.randn(7, 16), torch.randn(rows, 16)
    k = min(rows, 9)
    values, indices = _split_and_merge(query, bank, k, num_splits=5)
    assert_topk_consistent(query, bank, k, values, indices)


def test_top_k_all_in_one_tile():
    # The K best rows sit together in the middle of one tile of the last split.
    query = F.normalize(torch.randn(33, 64), dim=1)
    bank = torch.randn(1000, 64) * 0.01
    bank[900:916] = query[:1] * torch.linspace(2, 1, 16)[:, None]
    for num_splits in (1, 3):
        values, indices = _split_and_merge(query, bank, 16, num_splits=num_splits)
        assert torch.equal(indices[0], torch.arange(900, 916))
        assert_topk_consistent(query, bank, 16, values, indices)


# The plans of search_plan and their neighbours: (group rows, subgroup rows).
PLANS = [(64, 8), (64, 16), (128, 8), (128, 16)]
PLAN_IDS = [f"G{g}-S{s}" for g, s in PLANS]


@pytest.mark.parametrize("group_rows,sub_rows", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_ties_across_group_and_subgroup_boundaries(group_rows, sub_rows, num_splits):
    # Exact integer scores; every bank row appears twice, one copy on each side of a group
    # or subgroup boundary, so equal maxima of neighbouring groups decide the cut.
    query = torch.randint(-2, 3, (9, 16)).float()
    base = torch.randint(-2, 3, (90, 16)).float()
    bank = torch.zeros(420, 16)
    sides = torch.arange(90) * 4 + 2  # rows 2, 6, 10, ...: near every multiple of 8
    bank[sides] = base
    bank[sides + 1] = base  # the copy: same score, next row, often the next subgroup
    bank[::7] = base[:60]  # more ties, spread over groups and splits
    for k in (1, 5, 16):
        ref_values, ref_indices = reference.knn_topk(query, bank, k)
        values, indices = _split_and_merge(query, bank, k, group_rows=group_rows,
                                           sub_rows=sub_rows, num_splits=num_splits)
        assert torch.equal(indices, ref_indices), k
        assert torch.equal(values, ref_values)


@pytest.mark.parametrize("group_rows,sub_rows", PLANS, ids=PLAN_IDS)
def test_ties_at_the_cut_between_groups(group_rows, sub_rows):
    # Every group's maximum is the same value (1), at a different place in each group, and
    # K is smaller than the number of groups: the K-th group maximum (tau) is tied across
    # all groups, and only the smallest indices may win.
    query = torch.ones(3, 8)
    bank = -torch.rand(640, 8)  # scores < 0
    for g in range(0, 640, group_rows):
        bank[g + (g * 7) % group_rows] = 1.0 / 8
    k = 4
    ref_values, ref_indices = reference.knn_topk(query, bank, k)
    values, indices = _split_and_merge(query, bank, k, group_rows=group_rows, sub_rows=sub_rows,
                                       num_splits=2)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "list"])
@pytest.mark.parametrize("k", [1, 8])
def test_direct_and_compared_lists_agree_with_the_reference(direct, k):
    # A split of at most K_PAD groups keeps each group at its tile's slot (direct); a longer
    # one compares every group with its list's minimum. Both see ties across groups (every
    # row appears twice, often in neighbouring groups), groups whose best rows are
    # excluded, and, in the direct split, fewer groups than slots.
    query = torch.randint(-2, 3, (6, 16)).float()
    base = torch.randint(-2, 3, (500, 16)).float()
    bank = torch.stack([base, base], 1).reshape(1000, 16)
    exclude = reference.knn_topk(query, bank, 3)[1][:, 1:]  # the 2nd and 3rd best rows
    num_splits = 2 if direct else 1
    layout = kernels.split_layout(6, 1000, k, 64, num_splits)
    assert layout.direct == direct
    for exclusion in (None, exclude):
        ref_values, ref_indices = reference.knn_topk(query, bank, k, exclude=exclusion)
        values, indices = _split_and_merge(query, bank, k, group_rows=64, sub_rows=8,
                                           num_splits=num_splits, exclude=exclusion)
        assert torch.equal(indices, ref_indices)
        assert torch.equal(values, ref_values)


@pytest.mark.parametrize("k", [8, 16])
def test_top_k_all_in_one_subgroup(k):
    # The K best rows of a query fill one subgroup (8 or 16 rows) of one group: the merge
    # must refine that one subgroup for all K.
    query = F.normalize(torch.randn(5, 32), dim=1)
    bank = torch.randn(700, 32) * 0.01
    bank[336:336 + k] = query[:1] * torch.linspace(2, 1, k)[:, None]
    values, indices = _split_and_merge(query, bank, k, group_rows=64, sub_rows=k, num_splits=2)
    assert torch.equal(indices[0], torch.arange(336, 336 + k))
    assert_topk_consistent(query, bank, k, values, indices)


@pytest.mark.parametrize("rows", [1, 37, 64, 65, 191])
def test_banks_shorter_than_or_not_a_multiple_of_a_group(rows):
    # N < G, N == G, and a last group cut short by the bank's end.
    query, bank = torch.randn(7, 16), torch.randn(rows, 16)
    k = min(rows, 6)
    for group_rows, sub_rows in PLANS:
        values, indices = _split_and_merge(query, bank, k, group_rows=group_rows,
                                           sub_rows=sub_rows)
        assert_topk_consistent(query, bank, k, values, indices)


def test_exclusions_at_the_cut_with_subgroups():
    # Excluding each query's K-th best row and a row tied with it, with 8-row subgroups
    # and groups of 128: the next rows move up, in order.
    query = torch.randint(-2, 3, (6, 32)).float()
    bank = torch.randint(-2, 3, (900, 32)).float()
    _, order = reference.knn_topk(query, bank, 12)
    exclude = torch.cat([order[:, 5:7], torch.full((6, 1), -1)], dim=1)
    ref_values, ref_indices = reference.knn_topk(query, bank, 6, exclude=exclude)
    values, indices = _split_and_merge(query, bank, 6, group_rows=128, sub_rows=8,
                                       exclude=exclude, num_splits=3)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


# (query dtype, bank dtype): the bank's dtype is the search precision (the interpreter
# casts 16-bit tiles to fp32 before the dot, so the 16-bit paths run here too).
MIXED = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.float32, torch.float16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("query_dtype,bank_dtype", MIXED,
                         ids=["bf16", "fp16", "fp32-fp16", "bf16-fp32"])
def test_16_bit_and_mixed_dtypes(query_dtype, bank_dtype):
    query = torch.randn(9, 64).to(query_dtype)
    bank = F.normalize(torch.randn(400, 64), dim=1).to(bank_dtype)
    values, indices = ops.knn_topk(query, bank, 8, backend="triton")
    out_dtype = torch.promote_types(query_dtype, bank_dtype)
    assert values.dtype == out_dtype
    # The returned values are the rows' exact scores (fp32 from the stored inputs) ...
    rescored = torch.einsum("bd,bkd->bk", query.double(), bank.double()[indices])
    atol, rtol = TOLERANCES[out_dtype]
    torch.testing.assert_close(values.double(), rescored, atol=atol, rtol=rtol)
    # ... and, ranked in the search precision, within its rounding of the reference's.
    ref_values, _ = reference.knn_topk(query, bank, 8)
    torch.testing.assert_close(values.float(), ref_values.float(), atol=2e-2, rtol=0)
    assert all(len(set(row)) == 8 for row in indices.tolist())


@pytest.mark.parametrize("ranked", [False, True], ids=["rounds", "ranked"])
@pytest.mark.parametrize("k", [1, 7, 16])
def test_ranked_and_round_selections_agree(monkeypatch, ranked, k):
    # The merge's two selections either rank all candidates at once or take K rounds of
    # max (merge_blocks picks by the candidate count); both must give the reference's
    # indices exactly: ties across groups and at the cut, an all-NaN query, a row excluded
    # at the cut and a query left with fewer than K eligible rows.
    monkeypatch.setattr(kernels, "_RANKED_KEYS", 10**9 if ranked else 0)
    query = torch.randint(-2, 3, (6, 16)).float()
    query[2] = float("nan")
    bank = torch.randint(-2, 3, (330, 16)).float()
    bank[::5] = bank[1::5][:66]  # duplicated rows: equal scores at other indices
    _, order = reference.knn_topk(query, bank, k + 2)
    exclude = torch.cat([order[:, k - 1:k + 1], torch.full((6, 1), -1)], dim=1)
    exclude[4] = torch.tensor([-1, -1, -1])
    bank_short = bank[:k + 1]
    for b, ex in ((bank, exclude), (bank_short, torch.arange(3).expand(6, 3))):
        ref_values, ref_indices = reference.knn_topk(query, b, k, exclude=ex)
        for num_splits in (1, 3):
            values, indices = _split_and_merge(query, b, k, exclude=ex, num_splits=num_splits)
            assert torch.equal(indices, ref_indices), (num_splits, b.shape)
            torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=RTOL)


def test_large_batch_merge_blocks():
    # Past the small-batch bound the merge runs other blocks (one warp a row on a GPU).
    query, bank = torch.randn(kernels._SMALL_BATCH + 3, 16), torch.randn(150, 16)
    values, indices = ops.knn_topk(query, bank, 4, backend="triton")
    assert_topk_consistent(query, bank, 4, values, indices)


def test_fp32_queries_against_a_bf16_bank():
    # The search runs in the bank's precision; values and positiveness come out in fp32
    # from the fp32 key and online rows, recomputed from the gathered bf16 rows.
    key, online = torch.randn(9, 64), torch.randn(9, 64)
    bank = F.normalize(torch.randn(500, 64), dim=1).to(torch.bfloat16)
    out = ops.soft_neighbors(key, online, bank, 8, backend="triton")
    ref = reference.soft_neighbors(key, online, bank, 8)
    assert out.similarity.dtype == out.positiveness.dtype == torch.float32
    unit_key = F.normalize(key, dim=1)
    rescored = torch.einsum("bd,bkd->bk", unit_key, bank.float()[out.indices])
    torch.testing.assert_close(out.similarity, rescored, atol=ATOL, rtol=RTOL)
    # Ranked with the key rounded to bf16: the K-th value may differ by that rounding.
    torch.testing.assert_close(out.similarity, ref.similarity, atol=2e-2, rtol=0)
    expected = torch.softmax(torch.einsum("bd,bkd->bk", F.normalize(online, dim=1),
                                          F.normalize(out.neighbors.float(), dim=2)), dim=1)
    torch.testing.assert_close(out.positiveness, expected, atol=ATOL, rtol=RTOL)


def test_knn_topk_gradients_match_reference():
    query = torch.randn(7, 64, requires_grad=True)
    bank = torch.randn(333, 64, requires_grad=True)
    exclude = torch.tensor([[3, -1]] * 7)
    upstream = torch.randn(7, 16)
    grads = {}
    for backend in ("torch", "triton"):
        values, _ = ops.knn_topk(query, bank, 16, exclude=exclude, backend=backend)
        grads[backend] = torch.autograd.grad((values * upstream).sum(), (query, bank))
    for ours, ref in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_knn_topk_query_only_gradient_skips_bank():
    query = torch.randn(7, 16, requires_grad=True)
    values, _ = ops.knn_topk(query, torch.randn(50, 16), 3, backend="triton")
    (grad,) = torch.autograd.grad(values.sum(), query)
    assert grad.shape == query.shape and bool(grad.abs().sum() > 0)


SOFT_SHAPES = [(1, 5, 16, 3), (7, 333, 96, 16), (33, 100, 64, 1)]


@pytest.mark.parametrize("threshold", [False, True], ids=["plain", "threshold"])
@pytest.mark.parametrize("shape", SOFT_SHAPES, ids=_ids(SOFT_SHAPES))
def test_soft_neighbors_values_and_gradients(shape, threshold):
    batch, rows, dim, k = shape
    key = torch.randn(batch, dim, requires_grad=True)
    online = torch.randn(batch, dim, requires_grad=True)
    bank = F.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
    weights = [torch.randn(batch, k), torch.randn(batch, k), torch.randn(batch, k, dim)]
    results, grads = {}, {}
    for backend in ("torch", "triton"):
        out = ops.soft_neighbors(
            key, online, bank, k, attention_temperature=0.2, threshold=threshold, backend=backend
        )
        results[backend] = out
        outputs = (out.similarity, out.positiveness, out.neighbors)
        loss = sum((w * t).sum() for w, t in zip(weights, outputs))
        grads[backend] = torch.autograd.grad(loss, (key, online, bank))
    ours, ref = results["triton"], results["torch"]
    assert isinstance(ours, reference.SoftNeighbors)
    assert torch.equal(ours.indices, ref.indices)
    assert ours.neighbors.dtype == bank.dtype and torch.equal(ours.neighbors, ref.neighbors)
    torch.testing.assert_close(ours.similarity, ref.similarity, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.positiveness, ref.positiveness, atol=ATOL, rtol=RTOL)
    if threshold:
        assert bool((ours.positiveness.sum(1) <= 1 + ATOL).all())
    else:
        torch.testing.assert_close(ours.positiveness.sum(1), torch.ones(batch))
    for name, g_ours, g_ref in zip(("key", "online", "bank"), grads["triton"], grads["torch"]):
        torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=RTOL, msg=name)


def test_soft_neighbors_positiveness_gradient_through_online_only():
    key, bank = torch.randn(7, 32), F.normalize(torch.randn(64, 32), dim=1)
    online = torch.randn(7, 32, requires_grad=True)
    upstream = torch.randn(7, 5)
    grads = []
    for backend in ("torch", "triton"):
        out = ops.soft_neighbors(key, online, bank, 5, attention_temperature=0.5, backend=backend)
        grads.append(torch.autograd.grad((out.positiveness * upstream).sum(), online)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=RTOL)


def test_ops_register_on_import():
    assert hasattr(torch.ops.snclr, "knn_topk") and hasattr(torch.ops.snclr, "soft_neighbors")


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_knn_topk(requires_grad):
    query = torch.randn(7, 32, requires_grad=requires_grad)
    bank = torch.randn(100, 32, requires_grad=requires_grad)
    triton = dict(backend="triton")
    torch.library.opcheck(torch.ops.snclr.knn_topk.default, (query, bank, 3, None), triton)
    exclude = torch.tensor([[1, -1]] * 7)
    torch.library.opcheck(torch.ops.snclr.knn_topk.default, (query, bank, 1, exclude), triton)


def test_opcheck_soft_neighbors():
    query = F.normalize(torch.randn(7, 32), dim=1).requires_grad_()
    online = F.normalize(torch.randn(7, 32), dim=1).requires_grad_()
    bank = F.normalize(torch.randn(100, 32), dim=1).requires_grad_()
    exclude = torch.tensor([[2, 5]] * 7)
    op = torch.ops.snclr.soft_neighbors.default
    torch.library.opcheck(op, (query, online, bank, 4, exclude),
                          dict(attention_temperature=0.5, threshold=True, backend="triton"))
    torch.library.opcheck(op, (query.detach(), online, bank.detach(), 3),
                          dict(backend="triton"))


def test_torch_compile_with_gradient():
    key = torch.randn(7, 32, requires_grad=True)
    online = torch.randn(7, 32, requires_grad=True)
    bank = F.normalize(torch.randn(100, 32), dim=1)

    def loss_fn(key, online, bank, backend):
        out = ops.soft_neighbors(key, online, bank, 4, attention_temperature=0.5,
                                 backend=backend)
        return (out.similarity.sum() + (out.positiveness * out.similarity).sum())

    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)
    loss = compiled(key, online, bank, "triton")
    grads = torch.autograd.grad(loss, (key, online))
    ref_loss = loss_fn(key, online, bank, "torch")
    ref_grads = torch.autograd.grad(ref_loss, (key, online))
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


# GPU-only: low precision, a large bank, and every autotune configuration compiling.

GPU_DTYPES = [(dtype, *TOLERANCES[dtype]) for dtype in (torch.bfloat16, torch.float16)]


@requires_cuda
@pytest.mark.parametrize("dtype,atol,rtol", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape", [(33, 4099, 96, 16), (1024, 1 << 20, 256, 16)], ids=["odd", "large"]
)
def test_low_precision_and_large_bank_on_gpu(shape, dtype, atol, rtol):
    batch, rows, dim, k = shape
    key = torch.randn(batch, dim, device="cuda", dtype=dtype)
    online = torch.randn(batch, dim, device="cuda", dtype=dtype)
    bank = F.normalize(torch.randn(rows, dim, device="cuda"), dim=1).to(dtype)
    out = ops.soft_neighbors(key, online, bank, k, backend="triton")
    ref = reference.soft_neighbors(key, online, bank, k)
    similarity = out.similarity.float()
    torch.testing.assert_close(similarity, ref.similarity.float(), atol=atol, rtol=rtol)
    kth = ref.similarity.float()[:, -1:]
    assert bool((out.similarity.float() >= kth - atol).all())
    unit_key = F.normalize(key.float(), dim=1)
    rescored = torch.einsum("bd,bkd->bk", unit_key, bank.float()[out.indices])
    torch.testing.assert_close(out.similarity.float(), rescored, atol=atol, rtol=rtol)
    # Positiveness of the returned neighbours, independent of tie resolution.
    expected = torch.softmax(
        torch.einsum("bd,bkd->bk", F.normalize(online.float(), dim=1),
                     F.normalize(out.neighbors.float(), dim=2)), dim=1)
    torch.testing.assert_close(out.positiveness, expected, atol=1e-3, rtol=1e-3)


@requires_cuda
@pytest.mark.parametrize("k", [1, 16, 64])
@pytest.mark.parametrize("group_rows,sub_rows", [(64, 8), (128, 8)])
def test_every_split_config_compiles_and_runs(k, group_rows, sub_rows):
    configs, _ = kernels.split_configs()
    query = torch.randn(129, 128, device="cuda")
    bank = torch.randn(1000, 128, device="cuda")
    ref_values, _ = reference.knn_topk(query, bank, k)
    for config in configs:
        meta = config.kwargs
        keys, sub_maxima = kernels.knn_topk_split(
            query, bank, k, group_rows=group_rows, sub_rows=sub_rows, num_splits=3,
            block_b=meta["BLOCK_B"], num_warps=config.num_warps,
        )
        _, values, _ = kernels.knn_topk_merge(
            keys, sub_maxima, query, bank, k, sub_rows=sub_rows, values_dtype=torch.float32
        )
        torch.testing.assert_close(values, ref_values, atol=2e-2, rtol=2e-2, msg=str(config))


# Main variants of every kernel compile for an H200 (see tests/sm90.py).
_SM90_BODY = r'''
from snclr.kernels import knn_topk as kk

split = dict(exclude_ptr="*i64", cand_ptr="*i64", sub_ptr="*fp32")
# (K, dtype, D, BLOCK_D, exclude, cast, precision, BLOCK_N, SUB, DIRECT): one-pass and
# D-chunked widths, both plans of search_plan, kept and direct lists.
for k, dtype, dim, block_d, exclude, cast, precision, block_n, sub, direct in [
        (1, "bf16", 256, 256, False, False, "tf32", 128, 16, False),
        (16, "bf16", 96, 128, True, False, "tf32", 64, 8, False),
        (30, "bf16", 256, 256, True, False, "tf32", 64, 8, True),
        (64, "bf16", 256, 256, False, False, "tf32", 128, 16, False),
        (8, "fp32", 128, 128, True, False, "ieee", 64, 16, True),
        (5, "fp64", 320, 64, True, True, "tf32", 128, 8, False)]:
    build(kk._knn_topk_split_kernel, dict(split, q_ptr="*" + dtype, bank_ptr="*" + dtype),
          dict(K=k, K_PAD=max(8, triton.next_power_of_2(k)), HAS_EXCLUDE=exclude, E_PAD=4,
               D=dim, CAST_FP32=cast, INPUT_PRECISION=precision, BLOCK_B=64, BLOCK_N=block_n,
               BLOCK_D=block_d, SUB=sub, DIRECT=direct))
merge = dict(cand_ptr="*i64", sub_ptr="*fp32", q_ptr="*bf16", bank_ptr="*bf16",
             idx_ptr="*i64", val_ptr="*bf16", inv_attention_temperature="fp32",
             threshold_value="fp32")
for k, positiveness, threshold, exclude, batch, sub in [
        (1, False, False, False, 4096, 16), (16, True, True, True, 64, 8),
        (64, True, False, False, 4096, 16), (30, True, False, True, 128, 8)]:
    blocks = kk.merge_blocks(batch, k, 128 // sub, sub, 256)
    build(kk._knn_topk_merge_kernel, merge,
          dict(K=k, K_PAD=triton.next_power_of_2(k), SPLITS_PAD=64, S=128 // sub, SUB=sub,
               HAS_EXCLUDE=exclude, WITH_POSITIVENESS=positiveness, THRESHOLD=threshold,
               BLOCK_B=blocks.block_b, BLOCK_D=blocks.block_d, BLOCK_DW=blocks.block_dw,
               GATHER_STAGES=3, RANKED=blocks.ranked), num_warps=blocks.num_warps)
print("compiled")
'''


def test_kernels_compile_for_sm90():
    compile_for_sm90(_SM90_BODY)


# Every autotune config the prune keeps fits in registers: no local memory (spills) in its
# loops at the widest one-pass width, for the smallest and the largest running list, in
# both plans of search_plan.
_SM90_CONFIGS_BODY = r'''
from snclr.kernels import knn_topk as kk

configs, prune = kk.split_configs()
types = dict(q_ptr="*bf16", bank_ptr="*bf16", exclude_ptr="*i64", cand_ptr="*i64",
             sub_ptr="*fp32")
for k in (1, 64):
    for block_n, sub in ((64, 8), (128, 8)):
        k_pad = max(8, k)
        for c in prune(configs, dict(K_PAD=k_pad, BLOCK_N=block_n)):
            kernel = build(kk._knn_topk_split_kernel, types,
                           dict(K=k, K_PAD=k_pad, HAS_EXCLUDE=False, E_PAD=1, D=256,
                                CAST_FP32=False, INPUT_PRECISION="tf32", BLOCK_D=256,
                                BLOCK_N=block_n, SUB=sub, DIRECT=False, **c.kwargs),
                           num_warps=c.num_warps, num_stages=c.num_stages)
            assert local_memory_ops(kernel, loops_only=True) == 0, (k, block_n, c)
print("compiled")
'''


def test_kept_split_configs_do_not_spill_on_sm90():
    compile_for_sm90(_SM90_CONFIGS_BODY)

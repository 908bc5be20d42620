"""The O(N) CPU search (topk + exact tie resolution) against the stable-sort definition.

The oracle below is the contract written out per row in Python: rank every bank row by
(score descending, index ascending), NaN scores and excluded rows ranked at -inf. Inputs on
a coarse grid (multiples of 1/4, small D) make every score exact in float32, float64 and
bf16 products, so the oracle's float64 scores equal the search's and equal scores really
tie; grids with few levels put many equal scores across the K-th position.
"""

import math

import pytest
import torch

from snclr import ops, reference

# (B, N, D, K): one realistic (the CPU training step), several odd.
SHAPES = [(64, 4096, 128, 5), (1, 5, 16, 1), (7, 100, 96, 3), (33, 333, 64, 16)]
SHAPE_IDS = ["B{}-N{}-D{}-K{}".format(*s) for s in SHAPES]


def oracle_ranking(scores, k, exclude=None):
    """Top-k per row by (score desc, index asc); NaN and excluded rows rank at -inf."""
    out = []
    for b, row in enumerate(scores.tolist()):
        banned = set(exclude[b].tolist()) - {-1} if exclude is not None else set()
        ranked = [-math.inf if math.isnan(s) or n in banned else s for n, s in enumerate(row)]
        out.append(sorted(range(len(row)), key=lambda n: (-ranked[n], n))[:k])
    return torch.tensor(out, dtype=torch.int64)


def oracle_indices(query, bank, k, exclude=None):
    return oracle_ranking(query.double() @ bank.double().t(), k, exclude)


def grid(*shape, levels=9, dtype=torch.float32):
    """Random multiples of 1/4 in [-(levels // 2) / 4, (levels // 2) / 4]: exact products."""
    half = levels // 2
    return (torch.randint(-half, half + 1, shape) / 4).to(dtype)


def check_against_oracle(query, bank, k, exclude=None):
    values, indices = reference.knn_topk(query, bank, k, exclude=exclude)
    expected = oracle_indices(query, bank, k, exclude)
    assert torch.equal(indices, expected)
    scores = query.double() @ bank.double().t()
    picked = scores.gather(1, expected)
    eligible = ~picked.isnan()
    if exclude is not None:
        eligible &= ~(expected.unsqueeze(2) == exclude.unsqueeze(1)).any(2)
    # Rounded once to the output dtype, as the search rounds its exact float32 values.
    want = picked.masked_fill(~eligible, -math.inf).to(values.dtype)
    torch.testing.assert_close(values, want, atol=1e-12, rtol=1e-12)
    return values, indices


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float64_random_inputs_match_oracle(shape):
    b, n, d, k = shape
    query = torch.randn(b, d, dtype=torch.float64)
    bank = torch.randn(n, d, dtype=torch.float64)
    values, _ = check_against_oracle(query, bank, k)
    assert values.dtype == torch.float64


@pytest.mark.parametrize("levels", [3, 9], ids=["3-levels", "9-levels"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float32_grid_inputs_match_oracle(shape, levels):
    b, n, d, k = shape
    query, bank = grid(b, d, levels=levels), grid(n, d, levels=levels)
    check_against_oracle(query, bank, k)


def test_ties_straddling_the_kth_slot_go_to_smaller_indices():
    # Row 0 scores: 3 at n = 9; 2 at n = 7, 2, 5, 0; 1 elsewhere. K = 3 cuts the 2s.
    bank = torch.ones(12, 1)
    bank[[7, 2, 5, 0]] = 2.0
    bank[9] = 3.0
    query = torch.ones(2, 1)
    query[1] = -1.0  # row 1: the 1s win, all tied: smallest indices among them
    values, indices = reference.knn_topk(query, bank, 3)
    assert indices.tolist() == [[9, 0, 2], [1, 3, 4]]
    assert values.tolist() == [[3.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]
    check_against_oracle(query, bank, 3)


def test_ties_among_winners_above_the_cut_are_ordered_by_index():
    bank = torch.tensor([[1.0], [5.0], [5.0], [0.0], [5.0], [2.0]])
    _, indices = reference.knn_topk(torch.ones(1, 1), bank, 4)
    assert indices.tolist() == [[1, 2, 4, 5]]


def test_repeated_bank_rows_are_tied_everywhere():
    bank = grid(40, 16).repeat(3, 1)  # row n also at n + 40 and n + 80
    query = grid(9, 16)
    _, indices = check_against_oracle(query, bank, 7)
    assert (indices.min(1).values < 40).all()


def test_all_nan_rows_report_minus_inf_at_the_smallest_indices():
    query, bank = grid(5, 8), grid(30, 8)
    query[[1, 3]] = float("nan")
    values, indices = check_against_oracle(query, bank, 4)
    assert indices[1].tolist() == indices[3].tolist() == [0, 1, 2, 3]
    assert torch.isneginf(values[[1, 3]]).all() and torch.isfinite(values[[0, 2, 4]]).all()


def test_nan_bank_rows_never_win_and_input_is_not_modified():
    query, bank = grid(6, 8), grid(30, 8)
    bank[[0, 4, 17]] = float("nan")
    query_before, bank_before = query.clone(), bank.clone()
    values, indices = check_against_oracle(query, bank, 26)  # all 27 eligible rows but one
    assert not torch.isin(indices, torch.tensor([0, 4, 17])).any()
    assert torch.isfinite(values).all()
    assert torch.equal(query, query_before) and torch.equal(bank.isnan(), bank_before.isnan())
    assert torch.equal(bank.nan_to_num(), bank_before.nan_to_num())


def test_single_nan_scores_inside_rows():
    query, bank = grid(4, 1, levels=3), grid(50, 1, levels=3)
    query[:, 0] = 1.0
    bank[[3, 10, 11]] = float("nan")
    bank[[20, 30]] = float("inf")
    check_against_oracle(query, bank, 5)


def test_excluded_rows_at_the_threshold():
    query, bank = grid(8, 12, levels=5), grid(60, 12, levels=5)
    _, first = reference.knn_topk(query, bank, 6)
    # Exclude the K-th and (K+1)-th winners of the unrestricted search, one of the top
    # rows, and padding; row 0 excludes nothing but padding.
    exclude = torch.stack([first[:, 2], first[:, 3], first[:, 0], torch.full((8,), -1)], 1)
    exclude[0, :3] = -1
    values, indices = check_against_oracle(query, bank, 3, exclude)
    assert not (indices[1:].unsqueeze(2) == exclude[1:, :3].unsqueeze(1)).any()
    assert torch.equal(indices[0], first[0, :3])


def test_padding_does_not_touch_a_nan_score_in_column_zero():
    # Padding (-1) is redirected to column 0 as a no-op: a NaN there must still never win.
    bank = torch.tensor([[float("nan")], [1.0], [2.0], [3.0]])
    exclude = torch.tensor([[-1, 3]])
    values, indices = check_against_oracle(torch.ones(1, 1), bank, 3, exclude)
    assert indices.tolist() == [[2, 1, 0]]
    assert values[0, 2] == -math.inf


def test_exclusion_beyond_the_eligible_rows_reports_minus_inf():
    query, bank = grid(3, 4), grid(6, 4)
    exclude = torch.tensor([[0, 1, 2, 3], [5, 5, -1, -1], [-1, -1, -1, -1]])
    values, _ = check_against_oracle(query, bank, 4, exclude)
    assert torch.isneginf(values[0, 2:]).all() and torch.isfinite(values[0, :2]).all()
    assert torch.isneginf(values[1]).sum() == 0


@pytest.mark.parametrize("with_exclude", [False, True], ids=["plain", "exclude"])
def test_k_equals_n(with_exclude):
    query, bank = grid(5, 6, levels=3), grid(17, 6, levels=3)
    bank[4] = float("nan")
    exclude = torch.tensor([[1, -1]] * 5) if with_exclude else None
    values, indices = check_against_oracle(query, bank, 17, exclude)
    assert torch.equal(indices.sort(1).values, torch.arange(17).expand(5, 17))
    assert torch.isneginf(values[:, -1 - int(with_exclude) :]).all()


@pytest.mark.parametrize("levels", [3, 9], ids=["3-levels", "9-levels"])
def test_k_equals_one(levels):
    query, bank = grid(20, 8, levels=levels), grid(300, 8, levels=levels)
    query[3] = float("nan")
    check_against_oracle(query, bank, 1)


def test_float64_is_exact():
    # 21-bit inputs: every float64 score is exact, whatever the summation order.
    query = torch.randint(-(2**20), 2**20, (9, 8), dtype=torch.float64) / 2**20
    bank = torch.randint(-(2**20), 2**20, (500, 8), dtype=torch.float64) / 2**20
    bank[100] = bank[37]  # an exact tie, wherever it ranks
    # Row 7 beats row 3 by 2**-30 for query 0: float32 would round both to 1 and tie.
    query[0], bank[3], bank[7] = 0.0, 0.0, 0.0
    query[0, 0], bank[3, 0], bank[7, 0] = 1.0, 1.0, 1.0 + 2**-30
    values, indices = check_against_oracle(query, bank, 10)
    assert indices[0, :2].tolist() == [7, 3] and values.dtype == torch.float64
    torch.testing.assert_close(values, (query @ bank.t()).gather(1, indices), atol=0, rtol=0)
    assert reference.knn_topk(query.float(), bank.float(), 2)[1][0].tolist() == [3, 7]


def test_bfloat16_inputs_are_scored_in_float32():
    query, bank = grid(11, 24, dtype=torch.bfloat16), grid(200, 24, dtype=torch.bfloat16)
    values, _ = check_against_oracle(query, bank, 8)
    assert values.dtype == torch.bfloat16


def test_mixed_bf16_query_and_float32_bank():
    query, bank = grid(11, 24, dtype=torch.bfloat16), grid(200, 24)
    values, _ = check_against_oracle(query, bank, 8)
    assert values.dtype == torch.float32


def test_chunked_search_equals_one_chunk(monkeypatch):
    query, bank = grid(23, 16, levels=5), grid(90, 16, levels=5)
    query[4] = float("nan")
    exclude = torch.randint(-1, 90, (23, 3))
    whole = reference.knn_topk(query, bank, 6, exclude=exclude)
    monkeypatch.setattr(reference, "SEARCH_CHUNK_SCORES", 4 * 90)  # chunks of 4 rows, 3 left
    chunked = reference.knn_topk(query, bank, 6, exclude=exclude)
    assert torch.equal(chunked[1], whole[1]) and torch.equal(chunked[0], whole[0])
    assert torch.equal(chunked[1], oracle_indices(query, bank, 6, exclude))


def test_top_k_of_chunk_equals_stable_sort_on_raw_scores():
    """Scores drawn directly: few levels, NaN, -inf and +inf entries, many K."""
    scores = torch.randint(0, 4, (64, 50)).float()
    scores[torch.rand(64, 50) < 0.05] = float("nan")
    scores[torch.rand(64, 50) < 0.05] = float("-inf")
    scores[torch.rand(64, 50) < 0.02] = float("inf")
    scores[5] = float("nan")
    scores[6] = float("-inf")
    expected_all = oracle_ranking(scores, 50)
    assert torch.equal(reference._stable_top_k(scores.masked_fill(scores.isnan(), -math.inf), 50),
                       expected_all)
    for k in (1, 2, 7, 25, 49, 50):
        got = reference._top_k_of_chunk(scores.clone(), k)
        assert torch.equal(got, expected_all[:, :k]), f"k={k}"
        if k < 50:  # the torch.compile path, run eagerly
            got = reference._top_k_fixed_shapes(scores.clone(), k)
            assert torch.equal(got, expected_all[:, :k]), f"fixed shapes, k={k}"


def test_public_op_on_cpu_uses_the_same_contract():
    query, bank = grid(13, 32, levels=3), grid(400, 32, levels=3)
    query[2] = float("nan")
    exclude = torch.randint(-1, 400, (13, 5))
    values, indices = ops.knn_topk(query, bank, 9, exclude=exclude)
    assert torch.equal(indices, oracle_indices(query, bank, 9, exclude))
    ref_values, _ = reference.knn_topk(query, bank, 9, exclude=exclude)
    torch.testing.assert_close(values, ref_values, atol=0, rtol=0)

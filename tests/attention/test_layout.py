from attention.layout import balance_groups, dense_mask, pack, predicting_positions, token_reduction


def test_pack_layout_by_hand():
    # prompt [5, 6, 7] with responses [1, 2] and [3]; prompt [9] with response [4, 8, 8]
    b = pack([[5, 6, 7], [5, 6, 7], [9]], [[1, 2], [3], [4, 8, 8]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 3], [9, 4, 8, 8, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    assert b.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, -1, -1]]
    assert b.seq_row == [0, 0, 1] and b.seq_response == [0, 1, 0]
    row = b.rows[0]
    assert row.response_index.tolist() == [[3, 4], [5, 5]] and row.response_valid.tolist() == [[1, 1], [1, 0]]
    # r_1[0] and r_2[0] are both predicted at P-1 = 2; r_1[1] at 3
    assert predicting_positions(row)[row.response_valid].tolist() == [2, 3, 2]


def test_dense_mask_by_hand():
    b = pack([[5, 6], [5, 6]], [[1, 2], [3]], pad_id=0)
    m = dense_mask(b)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0],   # prompt: causal
                 [1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0],   # r_1[0]: prompt + itself
                 [1, 1, 1, 1, 0],   # r_1[1]
                 [1, 1, 0, 0, 1]]   # r_2[0]: prompt + itself, not r_1


def test_token_reduction():
    assert token_reduction(256, [64] * 8) == 8 * 320 / (256 + 512)


def test_balance_groups_keeps_groups_whole_and_balances_tokens():
    bins = balance_groups([900, 100, 500, 500], max_tokens=1000)
    assert sorted(g for b in bins for g in b) == [0, 1, 2, 3] and len(bins) == 2
    loads = sorted(sum([900, 100, 500, 500][g] for g in b) for b in bins)
    assert loads == [1000, 1000]
    assert len(balance_groups([900, 100, 500, 500], max_tokens=4096)) == 1  # everything fits in one
    # the lower bound of 2 micro-batches cannot hold 7, 7, 7 and 3 under 12 tokens each: a third
    bins = balance_groups([7, 7, 7, 3], max_tokens=12)
    assert sorted(sum([7, 7, 7, 3][g] for g in b) for b in bins) == [7, 7, 10]
    assert balance_groups([20, 3], max_tokens=12) == [[0], [1]]  # a group over the budget goes alone

"""The induction probe's recall batches: the multi-query (MQAR) layout and which positions are scored."""
import pytest
import torch

from benchmarks.induction_probe import BOS, FIRST, SEP, lr_factor, recall_batch


def test_two_queries_layout_and_scored_positions():
    ids, scored = recall_batch(torch.Generator().manual_seed(0), batch=3, pairs=4, value_len=1, pool=50, queries=2)
    # <s> a1 b1 a2 b2 a3 b3 a4 b4 | aj bj ak bk
    assert ids.shape == scored.shape == (3, 14)
    assert (ids[:, 0] == BOS).all() and (ids[:, 9] == SEP).all()
    assert ((ids[:, 1:9] >= FIRST) & (ids[:, 1:9] < FIRST + 50)).all()
    # the positions holding each query key predict its value
    expected = torch.zeros(14, dtype=torch.bool)
    expected[[10, 12]] = True
    assert (scored == expected).all()
    for row in range(3):
        pairs = dict(zip(ids[row, 1:9:2].tolist(), ids[row, 2:9:2].tolist()))
        assert len(pairs) == 4                                   # distinct keys
        qkeys = ids[row, [10, 12]].tolist()
        assert qkeys[0] != qkeys[1]                              # distinct queries
        assert [pairs[k] for k in qkeys] == ids[row, [11, 13]].tolist()


def test_two_queries_multi_token_values():
    ids, scored = recall_batch(torch.Generator().manual_seed(1), batch=2, pairs=3, value_len=2, pool=50, queries=2)
    # <s> (a b b')×3 | a_j b_j b_j' a_k b_k b_k': from each key and the first value token, predict the next
    assert ids.shape == (2, 1 + 9 + 1 + 6)
    assert scored[0].nonzero().flatten().tolist() == [11, 12, 14, 15]
    body = ids[:, 1:10].reshape(2, 3, 3)
    for row in range(2):
        for q in range(2):
            asked = ids[row, 11 + 3 * q:14 + 3 * q]
            assert any(torch.equal(asked, triple) for triple in body[row])


def test_one_query_is_the_default_and_queries_are_checked():
    ids, scored = recall_batch(torch.Generator().manual_seed(2), 2, 4, 1, 50)
    assert ids.shape == (2, 12) and scored[0].nonzero().flatten().tolist() == [10]
    with pytest.raises(ValueError, match="queries"):
        recall_batch(torch.Generator(), 2, 2, 1, 50, queries=3)


def test_lr_factor():
    assert lr_factor(50, 100, 1000, "constant") == 0.5 and lr_factor(500, 100, 1000, "constant") == 1.0
    assert lr_factor(100, 100, 1000, "cosine") == 1.0 and lr_factor(1000, 100, 1000, "cosine") == pytest.approx(0)

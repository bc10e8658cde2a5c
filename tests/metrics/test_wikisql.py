import pytest

from bigadapt.metrics.wikisql import canonical_query, logical_form_accuracy

GOLD = {"sel": 3, "agg": 3, "conds": [[5, 0, "Butler CC (KS)"], [1, 1, 10]]}


def test_structured_queries_compare_like_wikisql():
    same = {"sel": 3, "agg": 3, "conds": [[1, 1, "10"], [5, 0, "butler cc (ks)"]]}  # order and case free
    wrong_agg = {"sel": 3, "agg": 0, "conds": GOLD["conds"]}
    wrong_cond = {"sel": 3, "agg": 3, "conds": [[5, 0, "Butler CC (KS)"]]}
    assert logical_form_accuracy([same, wrong_agg, wrong_cond], [GOLD] * 3) == pytest.approx(1 / 3)


def test_sql_text():
    gold = "SELECT COUNT(School) FROM table WHERE Team = 'Butler CC (KS)' AND Year > 10"
    assert canonical_query(gold) == ("school", 3, frozenset({("team", 0, "butler cc (ks)"), ("year", 1, "10")}))
    assert canonical_query("select count school from table where year > 10 and team = butler cc (ks);") == (
        canonical_query(gold))
    assert canonical_query("SELECT Player FROM table") == ("player", 0, frozenset())
    predictions = [gold, "SELECT School FROM table WHERE Year > 10", "not sql at all"]
    assert logical_form_accuracy(predictions, [gold] * 3) == pytest.approx(1 / 3)

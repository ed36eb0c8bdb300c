"""Hand cases for the addition task's text formats and gold score."""

import pytest

from rlhf.world import arithmetic, gold_score


def _meta(a, b, fmt):
    return arithmetic.meta(a, b, fmt)


def test_formats_worked_by_hand():
    assert arithmetic.prompt(47, 38, "direct") == "<add> 47+38="
    assert arithmetic.prompt(7, 38, "reason") == "<add> 07+38= steps:"
    assert arithmetic.completion(47, 38, "direct") == " 085"
    # 7+8=15 carries 1 into 4+3+1=08; the answer is "08" then the ones digit "5".
    assert arithmetic.completion(47, 38, "reason") == " 7+8=15, 4+3+1=08, answer 085"
    assert arithmetic.completion(99, 99, "reason") == " 9+9=18, 9+9+1=19, answer 198"


def test_mistakes_are_wrong_when_they_should_be():
    assert arithmetic.completion(47, 38, "reason", mistake="carry") == " 7+8=15, 4+3+0=07, answer 075"
    assert arithmetic.completion(47, 38, "direct", mistake="digit") == " 086"
    assert arithmetic.completion(12, 30, "direct", mistake="carry") == " 042"  # no carry to forget


@pytest.mark.parametrize("a", range(0, 100, 7))
@pytest.mark.parametrize("b", range(0, 100, 11))
def test_correct_demonstrations_score_one(a, b):
    for fmt in arithmetic.FORMATS:
        p = arithmetic.prompt(a, b, fmt)
        assert gold_score("add", p, arithmetic.completion(a, b, fmt), _meta(a, b, fmt)) == 1.0


def test_direct_format_reads_the_first_number():
    m = _meta(47, 38, "direct")
    assert gold_score("add", "<add> 47+38=", " 085", m) == 1.0
    assert gold_score("add", "<add> 47+38=", " 85 and then 12", m) == 1.0
    assert gold_score("add", "<add> 47+38=", " 84", m) == 0.0
    assert gold_score("add", "<add> 47+38=", " 12 85", m) == 0.0
    assert gold_score("add", "<add> 47+38=", "", m) == 0.0


def test_reason_format_reads_the_number_after_answer():
    m = _meta(47, 38, "reason")
    p = "<add> 47+38= steps:"
    assert gold_score("add", p, " 7+8=15, 4+3+1=08, answer 085", m) == 1.0
    assert gold_score("add", p, " 7+8=15, 4+3+0=07, answer 075", m) == 0.0
    # Step results do not count: 85 appearing before "answer" is not the committed answer.
    assert gold_score("add", p, " 85, answer 84", m) == 0.0
    assert gold_score("add", p, " 7+8=15, 4+3+1=08", m) == 0.0  # never answered
    assert gold_score("add", p, " answer 1, answer 85", m) == 1.0  # the last answer counts


def test_meta_can_be_recovered_from_the_prompt():
    assert gold_score("add", "<add> 47+38= steps:", " answer 85", None) == 1.0
    assert gold_score("add", "<add> 47+38=", " 85", {}) == 1.0
    assert arithmetic.parse_prompt("<add> 07+38= steps:") == _meta(7, 38, "reason")

"""The keyword labeller: every signal, matching rules, final step, fallback, keyword files, statistics."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaffold_lib.data.label_stats import LabelStats
from scaffold_lib.data.signals import (
    ANSWER_SIGNAL,
    FALLBACK,
    FINAL_STEP,
    KEYWORD,
    PATTERN,
    SIGNALS,
    KeywordFileError,
    KeywordLabellerConfig,
    KeywordTable,
    Label,
    keyword_table,
    label_column,
    label_step,
    label_steps,
)


@pytest.fixture(scope="module")
def table() -> KeywordTable:
    return keyword_table()


def test_seven_signals():
    assert SIGNALS == (
        "addition_elaboration",
        "examples_illustration",
        "opinion_recall",
        "contrast_concession",
        "reasoning_analysis",
        "conclusion_summary",
        "response_generation",
    )


OPENING_CASES = [
    ("Also, the box has 3 more.", "addition_elaboration", "also"),
    ("In addition, we add 4.", "addition_elaboration", "in addition"),
    ("Moreover the rest is 2.", "addition_elaboration", "moreover"),
    ("Next, subtract 5.", "addition_elaboration", "next"),
    ("Then 4 + 3 = 7.", "addition_elaboration", "then"),
    ("For example, 3 piles of 2.", "examples_illustration", "for example"),
    ("For instance: 2 rows.", "examples_illustration", "for instance"),
    ("Consider the case n = 1.", "examples_illustration", "consider"),
    ("Say we had 10.", "examples_illustration", "say"),
    ("I think this is a distraction.", "opinion_recall", "i think"),
    ("I remember the rule.", "opinion_recall", "i remember"),
    ("I recall that 7 * 8 = 56.", "opinion_recall", "i recall"),
    ("Hmm, so far 12.", "opinion_recall", "hmm"),
    ("But the fact is irrelevant.", "contrast_concession", "but"),
    ("However, that is wrong.", "contrast_concession", "however"),
    ("Wait, 3 + 4 is 7.", "contrast_concession", "wait"),
    ("On the other hand, 5.", "contrast_concession", "on the other hand"),
    ("Actually, I made a slip.", "contrast_concession", "actually"),
    ("So 3 + 4 = 7.", "reasoning_analysis", "so"),
    ("Because 2 * 3 = 6.", "reasoning_analysis", "because"),
    ("Since she sold 4, 6 remain.", "reasoning_analysis", "since"),
    ("That means 9.", "reasoning_analysis", "that means"),
    ("Let me compute: 6 / 2 = 3.", "reasoning_analysis", "let me compute"),
    ("First, Ava has 5.", "reasoning_analysis", "first"),
    ("Therefore, Ava has 5 apples.", "conclusion_summary", "therefore"),
    ("Thus the count is 9.", "conclusion_summary", "thus"),
    ("In summary, 12.", "conclusion_summary", "in summary"),
    ("So overall, 3 + 4 = 7.", "conclusion_summary", "so overall"),
    ("Putting it together, 8.", "conclusion_summary", "putting it together"),
    ("The answer is 5.", "response_generation", "the answer is"),
    ("The final answer is 5.", "response_generation", "the final answer is"),
    ("**Answer:** 5", "response_generation", "**answer:**"),
]


@pytest.mark.parametrize("step, signal, keyword", OPENING_CASES)
def test_opening_keyword_per_signal(table, step, signal, keyword):
    label = label_step(step, False, table)
    assert label == Label(signal, KEYWORD, keyword, 1.0)


def test_every_signal_has_a_case():
    assert {signal for _, signal, _ in OPENING_CASES} == set(SIGNALS)


@pytest.mark.parametrize("step", ["HOWEVER, no.", "however, no.", "HoWeVeR no", "  However,\nno"])
def test_case_insensitive(table, step):
    assert table.match(step) == ("contrast_concession", "however")


@pytest.mark.parametrize(
    "step, signal",
    [
        ("However, 5.", "contrast_concession"),
        ("However: 5.", "contrast_concession"),
        ("However; 5.", "contrast_concession"),
        ('"But" is what he said.', "contrast_concession"),
        ("'Wait', she said.", "contrast_concession"),
        ("“Wait”, she said.", "contrast_concession"),
        ("(Then) add 3.", "addition_elaboration"),
        ("**Answer:** 5", "response_generation"),
        ("**Answer**: 5", "response_generation"),
        ("*Therefore*, 5.", "conclusion_summary"),
        ("- So, 5.", "reasoning_analysis"),  # a list dash is not a word
        ("> Hmm, 5.", "opinion_recall"),
        ("So... 5.", "reasoning_analysis"),
        ("E.g., 3 rows.", "examples_illustration"),
        ("Let's see: 6.", "reasoning_analysis"),
        ("No, that is wrong.", "contrast_concession"),
        ("Therefore,5", None),  # no space: "therefore,5" is one word, not the keyword
    ],
)
def test_punctuation(table, step, signal):
    hit = table.match(step)
    assert (hit[0] if hit else None) == signal


@pytest.mark.parametrize(
    "step, signal, keyword",
    [
        ("So overall, 7.", "conclusion_summary", "so overall"),
        ("So, overall 7.", "conclusion_summary", "so overall"),  # punctuation between the words is stripped
        ("So 7.", "reasoning_analysis", "so"),
        ("So the answer is 7.", "response_generation", "so the answer is"),
        ("So the total is 7.", "reasoning_analysis", "so"),
        ("So in the end, 7.", "conclusion_summary", "so in the end"),
        ("Let me compute 7.", "reasoning_analysis", "let me compute"),
        ("Let me think.", "reasoning_analysis", "let me"),
        ("The final answer is 3.", "response_generation", "the final answer is"),
        ("Final answer: 3.", "response_generation", "final answer"),
        ("And then 3.", "addition_elaboration", "and then"),
        ("In the end it is 3.", "conclusion_summary", "in the end"),
    ],
)
def test_longest_keyword_first(table, step, signal, keyword):
    assert table.match(step) == (signal, keyword)


@pytest.mark.parametrize(
    "step",
    [
        "Sometimes it rains.",
        "Sonia has 3 apples.",
        "Thenceforth we count.",
        "Butter costs 3.",
        "Nowhere to go.",
        "Alsoran",
        "Thusly.",
        "Hmmm.",
        "Answering is hard.",
        "Firstly, 3.",
        "Sot",
        "Since-when",
        "So-called 3.",
    ],
)
def test_word_boundary(table, step):
    assert table.match(step) is None


def test_long_whitespace_run_does_not_glue_a_cut_word(table):
    # the labeller looks at a bounded window of the step; a word cut by that window is not a word
    step = "The answer" + " " * 84 + "island is far away."
    assert table.match(step) is None
    assert table.match("The answer" + " " * 84 + "is 5") == ("response_generation", "the answer is")


def test_fallback_label(table):
    label = label_step("Ava counts 5 apples.", False, table)
    assert label == Label("reasoning_analysis", FALLBACK, None, 0.0)
    assert label_step("", False, table).labeller == FALLBACK
    assert label_step("Ava counts 5 apples.", False, table, fallback_signal="addition_elaboration") == Label(
        "addition_elaboration", FALLBACK, None, 0.0
    )


def test_final_step_is_response_generation(table):
    assert label_step("The answer is 5.", True, table) == Label(ANSWER_SIGNAL, KEYWORD, "the answer is", 1.0)
    assert label_step("**Answer:** 5", True, table) == Label(ANSWER_SIGNAL, KEYWORD, "**answer:**", 1.0)
    assert label_step("So the answer is 5.", True, table) == Label(ANSWER_SIGNAL, KEYWORD, "so the answer is", 1.0)
    # a final step that opens with another signal's keyword, or none, is still the answer
    assert label_step("Therefore 5.", True, table) == Label(ANSWER_SIGNAL, FINAL_STEP, None, 1.0)
    assert label_step("Five apples.", True, table) == Label(ANSWER_SIGNAL, FINAL_STEP, None, 1.0)


def test_label_steps_marks_only_the_last_step_final():
    steps = ["First, 3 apples.", "Ava buys 2 more.", "The answer is 5.", "Therefore 5."]
    labels = label_steps(steps)
    assert [(label.signal, label.labeller) for label in labels] == [
        ("reasoning_analysis", KEYWORD),
        ("reasoning_analysis", FALLBACK),
        ("response_generation", KEYWORD),
        ("response_generation", FINAL_STEP),
    ]
    assert label_steps([]) == []
    assert label_steps(["Hmm."]) == [Label(ANSWER_SIGNAL, FINAL_STEP, None, 1.0)]
    labels = label_steps(["Ava buys 2.", "5"], KeywordLabellerConfig(fallback_signal="opinion_recall"))
    assert labels[0] == Label("opinion_recall", FALLBACK, None, 0.0)


def test_labeller_config_rejects_unknown_fallback():
    with pytest.raises(ValueError, match="nonsense"):
        KeywordLabellerConfig(fallback_signal="nonsense")


def test_default_table_source_and_prefixes(table):
    assert table.source.endswith("signal_keywords.toml")
    assert set(table.prefixes) == set(SIGNALS)
    assert table.prefixes["conclusion_summary"] == "conclusion"
    assert table.max_words >= 4
    assert {s for s, _ in table.by_words.values()} == set(SIGNALS)


# ----------------------------------------------------------------------------------------------------------
# keyword files


def test_custom_keyword_file_replaces_default(tmp_path):
    path = tmp_path / "kw.toml"
    path.write_text(
        '[opinion_recall]\nprefix = "op"\nkeywords = ["Zorp", "blue moon"]\n\n'
        '[response_generation]\nkeywords = ["result"]\n',
        encoding="utf-8",
    )
    config = KeywordLabellerConfig(keywords_path=str(path))
    labels = label_steps(["Zorp, it is 3.", "Blue moon rising.", "So 3 + 4 = 7.", "Result: 7"], config)
    assert labels == [
        Label("opinion_recall", KEYWORD, "Zorp", 1.0),
        Label("opinion_recall", KEYWORD, "blue moon", 1.0),
        Label("reasoning_analysis", FALLBACK, None, 0.0),  # "so" is not in this file: no merge with the default
        Label(ANSWER_SIGNAL, KEYWORD, "result", 1.0),
    ]
    custom = keyword_table(str(path))
    assert custom.source == str(path)
    assert custom.prefixes["opinion_recall"] == "op"
    assert custom.prefixes["contrast_concession"] == "contrast"  # default prefix: first part of the name
    # the default table is untouched
    assert keyword_table().match("So 3") == ("reasoning_analysis", "so")


@pytest.mark.parametrize(
    "content, needle",
    [
        ('[opinion_recall\nkeywords = ["x"]', "not valid TOML"),
        ('[feelings]\nkeywords = ["x"]', "unknown signal"),
        ('[opinion_recall]\nkeywords = ["maybe"]\n[contrast_concession]\nkeywords = ["Maybe,"]', "both"),
        ('[opinion_recall]\nkeywords = "maybe"', "list of strings"),
        ('[opinion_recall]\nkeywords = ["ok", 3]', "list of strings"),
        ('[opinion_recall]\nkeywords = ["..."]', "empty"),
    ],
)
def test_malformed_keyword_files(tmp_path, content, needle):
    path = tmp_path / f"bad_{abs(hash(content))}.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KeywordFileError) as err:
        KeywordTable.load(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    with pytest.raises(KeywordFileError):
        label_steps(["x"], KeywordLabellerConfig(keywords_path=str(path)))


def test_unreadable_keyword_files(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(KeywordFileError, match="missing.toml"):
        KeywordTable.load(missing)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[opinion_recall]\nkeywords = ["caf\xe9"]\n')
    with pytest.raises(KeywordFileError, match="latin1.toml"):
        KeywordTable.load(latin1)


def test_same_keyword_twice_under_one_signal_is_fine():
    t = KeywordTable.from_mapping({"opinion_recall": {"keywords": ["hmm", "Hmm,"]}})
    assert t.match("Hmm, 5") == ("opinion_recall", "Hmm,")


# ----------------------------------------------------------------------------------------------------------
# statistics


def test_label_stats_on_a_hand_made_set():
    labels = (
        [Label("reasoning_analysis", KEYWORD, "so", 1.0)] * 4
        + [Label("contrast_concession", KEYWORD, "but", 1.0)]
        + [Label("response_generation", KEYWORD, "the answer is", 1.0)]
        + [Label("reasoning_analysis", FALLBACK, None, 0.0)] * 3
        + [Label("response_generation", FINAL_STEP, None, 1.0)]
    )
    stats = LabelStats()
    for label in labels:
        stats.add(label)
    assert stats.steps == 10
    assert stats.keyword_coverage == pytest.approx(0.6)
    assert stats.fallback_share == pytest.approx(0.3)
    d = stats.as_dict()
    assert d["steps"] == 10 and d["keyword_coverage"] == 0.6 and d["fallback_share"] == 0.3
    assert d["by_labeller"] == {KEYWORD: 6, FALLBACK: 3, FINAL_STEP: 1}
    assert list(d["by_signal"]) == list(SIGNALS)  # every signal listed, zeros included
    assert d["by_signal"]["reasoning_analysis"] == 7 and d["by_signal"]["response_generation"] == 2
    assert d["by_signal"]["opinion_recall"] == 0
    assert sum(d["by_signal"].values()) == 10


def test_label_stats_empty():
    stats = LabelStats()
    assert stats.keyword_coverage == 0.0 and stats.fallback_share == 0.0
    assert stats.as_dict()["steps"] == 0


# ----------------------------------------------------------------------------------------------------------
# properties


@settings(max_examples=500, deadline=None)
@given(st.text(), st.booleans())
def test_label_step_never_raises(text, is_final):
    table = keyword_table()
    label = label_step(text, is_final, table)
    assert label.signal in SIGNALS
    assert label.labeller in (KEYWORD, FALLBACK, FINAL_STEP)
    if is_final:
        assert label.signal == ANSWER_SIGNAL and label.confidence == 1.0
    if label.labeller == KEYWORD:
        assert label.keyword is not None and label.confidence == 1.0
    else:
        assert label.keyword is None


_vocab = sorted({w for key in keyword_table().by_words for w in key.split()}) + ["x", "5", "**", ",", "“", "Sometimes"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_vocab), max_size=7), st.sampled_from([" ", "  ", "\n", ", ", "\t"]))
def test_match_is_the_longest_matching_keyword(words, sep):
    """Reference: try every keyword of the table against the normalised opening words."""
    table = keyword_table()
    step = sep.join(words)
    opening = [w for w in (t.strip(",“*") for t in step.lower().split()) if w]
    best = None
    for key, hit in table.by_words.items():
        key_words = key.split(" ")
        if opening[: len(key_words)] == key_words and (best is None or len(key_words) > len(best[0].split(" "))):
            best = (key, hit)
    assert table.match(step) == (best[1] if best else None)


def test_a_dash_or_ellipsis_before_the_opening_word_does_not_hide_the_keyword():
    table = KeywordTable.load()
    assert label_step("— So the total is 5.", False, table).signal == "reasoning_analysis"
    assert label_step("…However, that is wrong.", False, table).signal == "contrast_concession"


# ----------------------------------------------------------------------------------------------------------
# label_column: the stage's batch labelling is `label_step`, step for step


def _as_rows(labels: list[Label]) -> list[dict]:
    return [
        {
            "signal": label.signal,
            "labeller": label.labeller,
            "keyword": label.keyword,
            "confidence": label.confidence,
            "keyword_signal": label.signal if label.labeller in (KEYWORD, PATTERN) else None,
        }
        for label in labels
    ]


_openings = st.lists(
    st.sampled_from(_vocab + ["48 / 2 = 24", "3 x 5 = 15", "Ünïcode", "—", "\n", " " * 90, "word" * 30, "So,"]),
    max_size=12,
).map(" ".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_openings, st.booleans()), min_size=1, max_size=8))
def test_label_column_labels_every_step_as_label_step_does(steps):
    table = keyword_table()
    texts, finals = [t for t, _ in steps], [f for _, f in steps]
    expected = _as_rows([label_step(t, f, table) for t, f in steps])
    assert label_column(pa.array(texts, pa.string()), pa.array(finals), table).to_pylist() == expected


def test_label_column_reads_a_pattern_beyond_the_opening_window():
    """A keyword is decided by the opening words, a pattern anywhere in the step: a computation far into a step with
    no keyword still labels it."""
    table = keyword_table()
    step = "Zorp " * 40 + "then 48 / 2 = 24."
    [row] = label_column(pa.array([step]), pa.array([False]), table).to_pylist()
    assert row["labeller"] == PATTERN and row == _as_rows([label_step(step, False, table)])[0]


_ascii_chars = list("abcsothenwiAST ,.:;!?*-'\"()5") + ["\t", "\n", "\r", "\x0b", "\x0c"]


def _rough(chars: list[str]) -> st.SearchStrategy[str]:
    return st.lists(
        st.one_of(st.sampled_from(_vocab), st.text(st.sampled_from(chars), max_size=40)), max_size=30
    ).flatmap(lambda parts: st.sampled_from([" ", "  ", "\n", "**", ", ", "\t "]).map(lambda sep: sep.join(parts)))


# mostly ASCII openings (matched as columns), some with a character that leaves the step to Python
_rough_steps = st.one_of(_rough(_ascii_chars), _rough(_ascii_chars + ["\x1c", "é", "—", "“"]))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_rough_steps, st.booleans()), min_size=1, max_size=10))
def test_label_column_agrees_with_label_step_on_rough_text(steps):
    """Columns and `label_step` agree on text of any whitespace, punctuation, case and length: short steps, steps
    whose opening window ends inside a word, and openings the columns leave to Python (non-ASCII, \\x1c)."""
    table = keyword_table()
    texts, finals = [t for t, _ in steps], [f for _, f in steps]
    expected = _as_rows([label_step(t, f, table) for t, f in steps])
    assert label_column(pa.array(texts, pa.string()), pa.array(finals), table).to_pylist() == expected


@pytest.mark.parametrize("pad", range(88, 100))
def test_label_column_at_the_edge_of_the_opening_window(table, pad):
    """The opening window is 24 characters a word: a keyword that starts at its edge is a keyword only when it lies
    whole inside it, as `match` decides."""
    for tail in ("on the other hand, 5", "so overall 7", "then", "sorry", "nowhere", "the answer island"):
        for head in ("x" * pad, "So" + " " * (pad - 2), "Wait " + "-" * (pad - 5), " " * pad):
            step = f"{head} {tail}"
            expected = _as_rows([label_step(step, False, table)])
            assert label_column(pa.array([step]), pa.array([False]), table).to_pylist() == expected, step


def test_label_column_over_chunks_and_custom_tables(tmp_path):
    """Chunked columns (as DuckDB streams them) and a table with patterns and other keywords label as `label_step`."""
    path = tmp_path / "k.toml"
    path.write_text(
        '[contrast_concession]\nkeywords = ["no,", "not so fast"]\n'
        '[reasoning_analysis]\nkeywords = ["so"]\npatterns = ["\\\\d+ apples"]\n'
    )
    custom = KeywordTable.load(path)
    steps = ["No, 3.", "Not so fast!", "So 4.", "We have 12 apples.", "Zorp.", "not", "NOT SO fast"]
    finals = [False, False, False, False, False, True, False]
    texts = pa.chunked_array([pa.array(steps[:3]), pa.array(steps[3:])])
    expected = _as_rows([label_step(t, f, custom, "opinion_recall") for t, f in zip(steps, finals)])
    got = label_column(texts, pa.chunked_array([pa.array(finals[:3]), pa.array(finals[3:])]), custom, "opinion_recall")
    assert got.to_pylist() == expected
    assert [r["labeller"] for r in expected] == [KEYWORD, KEYWORD, KEYWORD, PATTERN, FALLBACK, FINAL_STEP, KEYWORD]


@pytest.mark.parametrize("space", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2003", "\u3000"])
def test_label_column_splits_words_where_python_does(table, space):
    """str.split() splits at these, Arrow's ASCII split does not: such an opening is labelled by `label_step`."""
    for step in (f"So{space}5 apples.", f"On{space}the other hand, 5.", f"Thence{space}so."):
        expected = _as_rows([label_step(step, False, table)])
        assert label_column(pa.array([step]), pa.array([False]), table).to_pylist() == expected, repr(step)


@pytest.mark.parametrize(
    ("step", "keyword"),
    [
        ("** so the answer is 5", "so the answer is"),
        ("- - on the other hand, 5 more", "on the other hand"),
        ("* I am pretty sure it is 5", "i am pretty sure"),
        ("\t  So, the answer is 5", "so the answer is"),
        ("-- -- -- -- so the answer is", "so the answer is"),
    ],
)
def test_label_column_reads_past_markup_before_a_long_keyword(table, step, keyword):
    """Markup before the opening words uses no word: a four-word keyword after it is still found whole."""
    [row] = label_column(pa.array([step]), pa.array([False]), table).to_pylist()
    assert row["keyword"] == keyword and row == _as_rows([label_step(step, False, table)])[0]

"""The seven semantic signals and the keyword labeller (first labelling stage of the paper).

A step is labelled by the longest keyword its opening words match (case-insensitive, punctuation stripped).
The final step of a trace is the answer (`response_generation`). A step with no keyword gets a
deterministic fallback signal and `labeller = "fallback"`, so it is always counted, never hidden.
"""

from __future__ import annotations

import dataclasses
import re
import string
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, field_validator

from scaffold_lib.core.errors import UserError
from scaffold_lib.core.ids import content_id

SIGNALS: tuple[str, ...] = (
    "addition_elaboration",
    "examples_illustration",
    "opinion_recall",
    "contrast_concession",
    "reasoning_analysis",
    "conclusion_summary",
    "response_generation",
)
SIGNAL_INDEX: dict[str, int] = {name: i for i, name in enumerate(SIGNALS)}
NUM_SIGNALS = len(SIGNALS)
ANSWER_SIGNAL = "response_generation"
CONCLUSION_SIGNAL = "conclusion_summary"

# labeller values written to signal_labels.labeller: the keyword stage, then the LLM validation stage
KEYWORD, PATTERN, FALLBACK, FINAL_STEP = "keyword", "pattern", "fallback", "final_step"
LLM, LLM_AGREE, LLM_OVERRIDE = "llm", "keyword+llm-agree", "llm-override"
KEYWORD_MATCHED = (KEYWORD, LLM_AGREE, LLM_OVERRIDE)  # labellers of the steps whose opening matched a keyword

_STRIP = string.punctuation + "“”‘’«»—–…"
DEFAULT_KEYWORDS_PATH = "scaffold_lib/data/signal_keywords.toml"


class KeywordFileError(UserError):
    """The keyword file is malformed; the message names the file and the entry."""


def _iter_words(text: str, limit: int) -> Iterator[str]:
    """The opening words of a step, lower-cased, punctuation stripped, at most `limit` (lazily: a keyword lookup
    usually stops after the first one or two)."""
    cut = 24 * limit
    tokens = text[:cut].lower().split()
    if len(text) > cut and not text[cut].isspace() and not text[cut - 1].isspace():
        tokens = tokens[:-1]  # the window cut a word in two: its first half is not a word ("is|land")
    n = 0
    for token in tokens:
        token = token.strip(_STRIP)
        if token:  # markup alone ("**", "-") is not a word: it must not use up the window
            yield token
            n += 1
            if n == limit:
                return


@dataclass(frozen=True)
class KeywordTable:
    """Keyword -> signal, keyed by normalised word tuples, plus the text prefix of each signal and the patterns that
    label a step no keyword opens (a computation `a op b = c` is reasoning, whatever word it starts with)."""

    by_words: dict[str, tuple[str, str]]  # "in addition" -> (signal, original keyword)
    prefixes: dict[str, str]  # signal -> short prefix tag ("conclusion")
    max_words: int
    source: str
    patterns: tuple[tuple[re.Pattern, str, str], ...] = ()  # (compiled, signal, as written)

    @classmethod
    def load(cls, path: str | Path | None = None) -> KeywordTable:
        if path is None:
            text = resources.files("scaffold_lib").joinpath("data/signal_keywords.toml").read_text("utf-8")
            source = DEFAULT_KEYWORDS_PATH
        else:
            source = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise KeywordFileError(f"{source}: cannot read keyword file: {exc}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise KeywordFileError(f"{source}: not valid TOML: {exc}") from exc
        return cls.from_mapping(data, source)

    @classmethod
    def from_mapping(cls, data: dict, source: str = "<mapping>") -> KeywordTable:
        unknown = sorted(set(data) - set(SIGNALS))
        if unknown:
            raise KeywordFileError(f"{source}: unknown signal name(s) {unknown}; expected some of {list(SIGNALS)}")
        by_words: dict[str, tuple[str, str]] = {}
        prefixes: dict[str, str] = {}
        patterns: list[tuple[re.Pattern, str, str]] = []
        for signal in SIGNALS:
            entry = data.get(signal, {})
            prefixes[signal] = str(entry.get("prefix", signal.split("_")[0]))
            for pattern in entry.get("patterns", []):
                try:
                    patterns.append((re.compile(pattern), signal, pattern))
                except (re.error, TypeError) as exc:
                    raise KeywordFileError(
                        f"{source}: [{signal}] pattern {pattern!r} is not a regular expression: {exc}"
                    ) from exc
            keywords = entry.get("keywords", [])
            if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
                raise KeywordFileError(f"{source}: [{signal}].keywords must be a list of strings")
            for keyword in keywords:
                key = " ".join(_iter_words(keyword, 16))
                if not key:
                    raise KeywordFileError(f"{source}: [{signal}] keyword {keyword!r} is empty after normalising")
                if key in by_words and by_words[key][0] != signal:
                    raise KeywordFileError(
                        f"{source}: keyword {keyword!r} is listed under both {by_words[key][0]} and {signal}"
                    )
                by_words[key] = (signal, keyword)
        max_words = max((k.count(" ") + 1 for k in by_words), default=1)
        return cls(by_words=by_words, prefixes=prefixes, max_words=max_words, source=source, patterns=tuple(patterns))

    @cached_property
    def digest(self) -> str:
        """What a label depends on in this table: the keywords and patterns with their signals (not the file name)."""
        return content_id("keyword-table", sorted(self.by_words.items()), [(p, s) for _, s, p in self.patterns])

    @cached_property
    def _stems(self) -> frozenset[str]:
        """Every proper word-prefix of a keyword ("so", "so the", "so the answer" for "so the answer is")."""
        stems = set()
        for key in self.by_words:
            words = key.split(" ")
            stems.update(" ".join(words[:n]) for n in range(1, len(words)))
        return frozenset(stems)

    def match_pattern(self, step: str) -> tuple[str, str] | None:
        """(signal, pattern) of the first pattern found anywhere in a step no keyword opens, or None."""
        for regex, signal, pattern in self.patterns:
            if regex.search(step):
                return signal, pattern
        return None

    def match(self, step: str) -> tuple[str, str] | None:
        """(signal, keyword) of the longest keyword the step opens with, or None.

        The opening words are `_iter_words`' (inlined: this runs once per step, millions of times). Grows the opening
        word by word and stops as soon as no keyword starts with it (usually after one or two words), which finds the
        same longest keyword as trying every length from the longest down."""
        limit = self.max_words
        cut = 24 * limit
        tokens = step[:cut].lower().split()
        if len(step) > cut and not step[cut].isspace() and not step[cut - 1].isspace():
            tokens.pop()  # the window cut a word in two
        by_words, stems = self.by_words, self._stems
        key = hit = None
        n = 0
        for token in tokens:
            token = token.strip(_STRIP)
            if not token:
                continue
            if key is None:
                key = token
                hit = by_words.get(key)
            elif key not in stems:
                break
            else:
                key = f"{key} {token}"
                hit = by_words.get(key) or hit
            n += 1
            if n == limit:
                break
        return hit

    @cached_property
    def without_patterns(self) -> KeywordTable:
        return dataclasses.replace(self, patterns=())


@lru_cache(maxsize=8)
def keyword_table(path: str | None = None) -> KeywordTable:
    return KeywordTable.load(path)


@dataclass(frozen=True)
class Label:
    signal: str
    labeller: str
    keyword: str | None
    confidence: float


class KeywordLabellerConfig(BaseModel):
    """The keyword labeller: which keyword table, and the signal of a step no keyword matches (counted as fallback)."""

    keywords_path: str | None = Field(
        None, description="a TOML keyword table; default: the built-in one", json_schema_extra={"flag": "keywords"}
    )
    fallback_signal: str = "reasoning_analysis"

    @field_validator("fallback_signal")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SIGNAL_INDEX:
            raise ValueError(f"fallback_signal {value!r} is not one of {list(SIGNALS)}")
        return value


# Labels are immutable and few distinct ones exist (one per keyword, plus fallback / final step): share them
# instead of allocating one object per step (1 M steps would otherwise be 1 M objects for the GC to scan).
_label = lru_cache(maxsize=4096)(Label)


def label_step(step: str, is_final: bool, table: KeywordTable, fallback_signal: str = "reasoning_analysis") -> Label:
    hit = table.match(step)
    if is_final:
        # The final step carries the answer whatever it opens with.
        if hit is not None and hit[0] == ANSWER_SIGNAL:
            return _label(ANSWER_SIGNAL, KEYWORD, hit[1], 1.0)
        return _label(ANSWER_SIGNAL, FINAL_STEP, None, 1.0)
    if hit is not None:
        return _label(hit[0], KEYWORD, hit[1], 1.0)
    pattern = table.match_pattern(step) if table.patterns else None
    if pattern is not None:
        return _label(pattern[0], PATTERN, pattern[1], 1.0)
    return _label(fallback_signal, FALLBACK, None, 0.0)


def label_steps(steps: list[str], config: KeywordLabellerConfig = KeywordLabellerConfig()) -> list[Label]:
    table = keyword_table(config.keywords_path)
    last = len(steps) - 1
    return [label_step(s, i == last, table, config.fallback_signal) for i, s in enumerate(steps)]


# Python's str.split() also splits at these four; Arrow's ASCII split does not: a step opening with one is left to Python
_PY_ONLY_WHITESPACE = "[\x1c-\x1f]"
_LABELLERS: tuple[str, ...] = (KEYWORD, PATTERN, FALLBACK, FINAL_STEP)


def _opening_words(heads: pa.Array, cut: int, limit: int, full: bool = False) -> list[pa.Array]:
    """`_iter_words` over a column of ASCII heads (a step's first `cut` + 1 characters): `limit` columns, the k-th
    holding each step's k-th opening word (null where it has fewer words).

    Splits each head at its first `limit` whitespace runs only (the opening words are all a keyword needs); a row
    whose first pieces are not all words (markup such as "**" or "-" is stripped away) is split again in `full`."""
    n, splits = len(heads), cut if full else limit
    # the window cut a word in two: its first half is not a word
    cut_word = pc.and_(
        pc.greater(pc.utf8_length(heads), cut),
        pc.invert(
            pc.or_(
                pc.ascii_is_space(pc.utf8_slice_codeunits(heads, cut, cut + 1)),
                pc.ascii_is_space(pc.utf8_slice_codeunits(heads, cut - 1, cut)),
            )
        ),
    ).to_numpy(zero_copy_only=False)
    body = pc.ascii_lower(pc.utf8_slice_codeunits(heads, 0, cut))
    pieces = pc.ascii_split_whitespace(body, max_splits=splits)
    counts = pc.list_value_length(pieces).to_numpy()
    row = pc.list_parent_indices(pieces).to_numpy()
    pos = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    whole = counts[row] <= splits  # the row's last piece is its last word
    first = full | (pos < limit)  # past `limit`, a first split's piece is the unsplit rest of the window
    words = pc.ascii_trim(pc.list_flatten(pieces).filter(pa.array(first)), string.punctuation)  # _STRIP, for ASCII
    row, pos, whole = row[first], pos[first], whole[first]
    is_word = pc.binary_length(words).to_numpy() > 0
    keep = is_word & ~((pos == counts[row] - 1) & cut_word[row])  # a last piece is only ever kept from a whole row
    columns = _ranked(words.filter(pa.array(keep)), row[keep], n, limit)
    again = np.unique(row[~is_word & ~whole])  # a piece was no word and the window has more: split it all
    if len(again):
        redone = _opening_words(heads.take(pa.array(again)), cut, limit, full=True)
        mask = np.zeros(n, bool)
        mask[again] = True
        columns = [pc.replace_with_mask(c, pa.array(mask), r) for c, r in zip(columns, redone)]
    return columns


def _ranked(words: pa.Array, row: np.ndarray, n: int, limit: int) -> list[pa.Array]:
    """Words in row order (`row[i]` the row of `words[i]`) as `limit` columns: the k-th word of each row, or null."""
    if not len(row):
        return [pa.nulls(n, pa.string())] * limit
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    rank = np.arange(len(row)) - np.repeat(starts, np.diff(np.r_[starts, len(row)]))
    columns = []
    for k in range(limit):
        at = np.flatnonzero(rank == k)
        index = np.full(n, -1, np.int64)
        index[row[at]] = at
        columns.append(words.take(pa.array(index, mask=index < 0)))
    return columns


def _keyword_hits(heads: pa.Array, table: KeywordTable) -> np.ndarray:
    """`KeywordTable.match` over a column of ASCII heads: the index into `table.by_words` of the longest keyword each
    step opens with, -1 for none."""
    keys = pa.array(list(table.by_words), pa.string())
    words = _opening_words(heads, 24 * table.max_words, table.max_words)
    key, hit = words[0], pc.index_in(words[0], value_set=keys)
    for word in words[1:]:
        key = pc.binary_join_element_wise(key, word, " ")
        hit = pc.coalesce(pc.index_in(key, value_set=keys), hit)
    return hit.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _decoded(codes: np.ndarray, values: list) -> pa.Array:
    """Codes into `values` (-1: null) as a plain Arrow column."""
    return pa.DictionaryArray.from_arrays(
        pa.array(codes, pa.int32(), mask=codes < 0), pa.array(values)
    ).dictionary_decode()


def label_column(
    texts: pa.ChunkedArray | pa.Array,
    is_final: pa.ChunkedArray | pa.Array,
    table: KeywordTable,
    fallback_signal: str = "reasoning_analysis",
) -> pa.Table:
    """`label_step` over a batch: Arrow strings and booleans in, an Arrow table of labels out (signal, labeller,
    keyword, confidence, keyword_signal), row for row.

    A step's opening window (a keyword looks no further) is matched as columns when it is ASCII without the four
    control characters `str.split()` splits at and Arrow does not, which exactly reproduces `match` there
    (tests/test_signals.py checks it); any other opening goes through `label_step` itself.
    The whole text comes into Python only for a step a pattern might label."""
    heads = pc.utf8_slice_codeunits(texts, 0, 24 * table.max_words + 1)
    heads = heads.combine_chunks() if isinstance(heads, pa.ChunkedArray) else heads
    final = (is_final.combine_chunks() if isinstance(is_final, pa.ChunkedArray) else is_final).to_numpy(
        zero_copy_only=False
    )
    entries = list(table.by_words.values())
    keywords = [written for _, written in entries] + [p for _, _, p in table.patterns]
    keyword_code = {k: i for i, k in reversed(list(enumerate(keywords)))}
    hit = _keyword_hits(heads, table)
    hit_signal = np.array([SIGNAL_INDEX[s] for s, _ in entries] + [-1], np.int64)[hit]  # hit -1 -> -1
    answer, fallback = SIGNAL_INDEX[ANSWER_SIGNAL], SIGNAL_INDEX[fallback_signal]
    kw, pattern, fb, final_step = range(len(_LABELLERS))
    answer_hit = hit_signal == answer
    signal = np.where(final, answer, np.where(hit >= 0, hit_signal, fallback))
    labeller = np.where(final, np.where(answer_hit, kw, final_step), np.where(hit >= 0, kw, fb))
    keyword = np.where(final & ~answer_hit, -1, hit)

    def put(rows: np.ndarray, labels: list[Label]) -> None:
        signal[rows] = [SIGNAL_INDEX[label.signal] for label in labels]
        labeller[rows] = [_LABELLERS.index(label.labeller) for label in labels]
        keyword[rows] = [-1 if label.keyword is None else keyword_code[label.keyword] for label in labels]

    not_exact = pc.invert(
        pc.and_(pc.string_is_ascii(heads), pc.invert(pc.match_substring_regex(heads, _PY_ONLY_WHITESPACE)))
    )
    rows = np.flatnonzero(not_exact.to_numpy(zero_copy_only=False))
    if len(rows):
        first = table.without_patterns
        python_heads = heads.take(pa.array(rows)).to_pylist()
        put(rows, [label_step(h, bool(final[r]), first, fallback_signal) for h, r in zip(python_heads, rows)])
    if table.patterns:  # a pattern is searched in the whole step: look again where only a pattern could label it
        rows = np.flatnonzero(labeller == fb)
        found = [(r, table.match_pattern(t)) for r, t in zip(rows, texts.take(pa.array(rows)).to_pylist())]
        found = [(r, hit) for r, hit in found if hit is not None]
        if found:
            put(np.array([r for r, _ in found]), [_label(hit[0], PATTERN, hit[1], 1.0) for _, hit in found])
    ruled = (labeller == kw) | (labeller == pattern)
    return pa.table(
        {
            "signal": _decoded(signal, list(SIGNALS)),
            "labeller": _decoded(labeller, list(_LABELLERS)),
            "keyword": _decoded(keyword, keywords),
            "confidence": pa.array(np.where(labeller == fb, 0.0, 1.0), pa.float64()),
            "keyword_signal": _decoded(np.where(ruled, signal, -1), list(SIGNALS)),
        }
    )

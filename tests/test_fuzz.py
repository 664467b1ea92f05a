"""Fuzzing (hypothesis) of the data loaders and of the verifier's extraction, screening and scoring.

Every input that once broke something is kept as an ``@example``.
"""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lens.data import last_boxed, load_competition, load_dapo, load_gsm8k, load_math, read_problems, write_problems
from lens.data.gold_check import GoldCheck
from lens.reward_health import MAX_BRACE_DEPTH, braces_too_deep, screen
from lens.verify import Verifier

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text as sources and models produce it, and worse: any code point, lone surrogates, NUL, LaTeX's specials.
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("\x00{}\\$^_"))
TEXT = st.text(alphabet=ANY_CHAR, max_size=30)
LATEX_TOKENS = ["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "\\\\", "$", "^", "_", "\\frac", "\\sqrt",
                "1", "2", "10", "x", "=", "+", "-", "(", ")", ",", ".", " ", "\n", "\\pi", "\\text{", "@", "#", "!",
                "The answer is ", "\x00", "\udcff", "\ufffd", "\\left(", "\\right)", "&", "%"]
LATEX = st.lists(st.sampled_from(LATEX_TOKENS), max_size=30).map("".join)


@pytest.fixture(autouse=True)
def _quiet_loaders(caplog):
    caplog.set_level(logging.ERROR)  # the loaders warn about every dropped row


# ---- data loaders ------------------------------------------------------------------------------
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
JSON = st.recursive(JSON_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)
LEVEL = st.sampled_from([1, 3, 5, 0, 6, -1, "Level 2", "Level ?", " 4 ", "5.0", True, 2.0])
CHAT = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": TEXT}), max_size=2)


ID = st.one_of(st.sampled_from(["a", "b"]), TEXT)  # repeats: duplicate ids
PROBLEM = st.one_of(TEXT, st.just("What is 1+1?"), st.just("y" * 20_001))  # and one over MAX_PROBLEM_CHARS


def _either(valid):
    """Mostly a value of the right kind, sometimes any JSON at all."""
    return st.one_of(valid, valid, valid, JSON)


# Rows of each public schema, every field missing, right, or any JSON value at all.
ROW = st.fixed_dictionaries({}, optional={
    "problem": _either(PROBLEM), "question": _either(PROBLEM), "level": _either(LEVEL), "answer": _either(TEXT),
    "solution": _either(TEXT.map(lambda t: f"so \\boxed{{{t}}}")), "unique_id": _either(ID),
    "subject": _either(TEXT), "type": _either(TEXT), "id": _either(ID), "year": _either(st.sampled_from([2024, "2023"])),
    "url": _either(st.sampled_from(["https://x/2024_AIME_I_Problems/1", "https://x/2023_AMC_12A"])),
    "prompt": _either(CHAT), "reward_model": _either(st.fixed_dictionaries({"ground_truth": TEXT})),
    "extra_info": _either(st.fixed_dictionaries({"index": ID})),
})
# Rows that each loader could keep (its required fields present), to reach past the first checks.
SCHEMA_ROW = {
    "math": st.fixed_dictionaries({"problem": PROBLEM, "level": LEVEL}, optional={
        "answer": TEXT, "solution": TEXT.map(lambda t: f"so \\boxed{{{t}}}"), "unique_id": ID, "type": TEXT}),
    "gsm8k": st.fixed_dictionaries({"question": PROBLEM, "answer": st.one_of(TEXT, TEXT.map(lambda t: f"... #### {t}"))}),
    "dapo": st.fixed_dictionaries({"prompt": CHAT, "reward_model": st.fixed_dictionaries({"ground_truth": TEXT})},
                                  optional={"extra_info": st.fixed_dictionaries({"index": ID})}),
    "aime2024": st.fixed_dictionaries({"problem": PROBLEM, "answer": st.one_of(TEXT, st.integers(), st.floats())},
                                      optional={"id": ID, "year": st.sampled_from([2024, 2023, "2024"])}),
}
LOADERS = {"math": load_math, "gsm8k": load_gsm8k, "dapo": load_dapo,
           "aime2024": lambda path: load_competition(path, "aime2024", 2024)}
LEVELS = {"math": set(range(1, 6)), "gsm8k": {1}, "dapo": {0}, "aime2024": {0}}


def _line(row_or_text: str) -> bytes:
    return row_or_text.encode("utf-8", "surrogatepass")


def _files(name: str):
    line = st.one_of(st.one_of(ROW, SCHEMA_ROW[name], SCHEMA_ROW[name], JSON).map(json.dumps).map(_line),
                     TEXT.map(_line), st.binary(max_size=30))
    return st.tuples(st.just(name), st.lists(line, max_size=6))


FILES = st.sampled_from(sorted(LOADERS)).flatmap(_files)  # (loader name, lines of a .jsonl file)

# A row whose JSON escapes a lone surrogate: it loaded, then `lens prepare` crashed writing it
# (UnicodeEncodeError, naming neither file nor line).
SURROGATE_ROW = [b'{"problem": "What is \\udcff 1+1?", "level": 1, "answer": "2", "question": "x",'
                 b' "prompt": [{"role": "user", "content": "\\udcff"}], "reward_model": {"ground_truth": "2"}}']
# A line nested deeper than the interpreter's stack: json.loads raised RecursionError out of the loader.
DEEP_LINE = [b"[" * 100_000 + b"]" * 100_000]


def _load(tmp_path_factory, name: str, lines: list[bytes]):
    path = tmp_path_factory.getbasetemp() / f"fuzz_{name}.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path, LOADERS[name](str(path))


@FAST
@given(file=FILES)
@example(file=("math", [b"", b"  "]))
@example(file=("gsm8k", [b"\xff\xfe", b"[1, 2]", b'"text"', b"{"]))
@example(file=("dapo", SURROGATE_ROW))
def test_a_loader_counts_every_row_and_keeps_only_usable_problems(tmp_path_factory, file):
    name, lines = file
    rows = sum(1 for raw in b"\n".join(lines).splitlines() if raw.strip())
    try:
        _, (problems, report) = _load(tmp_path_factory, name, lines)
    except ValueError as exc:  # the one refusal: a file without a single row
        assert rows == 0 and "is empty" in str(exc)
        return
    assert report.rows == rows and report.kept == len(problems)
    assert report.kept + sum(report.dropped.values()) == report.rows, report
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.problem.strip() and p.answer.strip() and p.level in LEVELS[name], p
        assert all(isinstance(v, str) for v in (p.id, p.problem, p.answer, p.subject))


@FAST
@given(file=FILES)
@example(file=("math", SURROGATE_ROW))
@example(file=("gsm8k", DEEP_LINE))
def test_every_loaded_problem_can_be_written_and_read_back(tmp_path_factory, file):
    name, lines = file
    try:
        path, (problems, _) = _load(tmp_path_factory, name, lines)
    except ValueError:
        return
    out = path.with_suffix(".out.jsonl")
    write_problems(out, problems)
    assert read_problems(out) == problems


@FAST
@given(content=FILES.map(lambda file: b"\n".join(file[1])))
@example(content=b"[1, 2]")
@example(content=b'{"id": "a"}')
@example(content=b"\xff")
@example(content=b'{"id": 1, "problem": 2, "answer": 3, "level": "x", "subject": null}')
@example(content=DEEP_LINE[0])
def test_read_problems_returns_typed_problems_or_names_the_file_and_line(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "fuzz_read.jsonl"
    path.write_bytes(content)
    try:
        problems = read_problems(path)
    except ValueError as exc:
        assert str(path) in str(exc) and re.search(r"line \d+", str(exc)), exc
        return
    for p in problems:
        assert all(isinstance(v, str) for v in (p.id, p.problem, p.answer, p.subject)) and type(p.level) is int


# ---- the verifier: extraction, screening, scoring ---------------------------------------------
def _stack_depth(text: str) -> int:
    """Reference: deepest nesting of matched (unescaped) brace pairs, by a stack."""
    text = re.sub(r"\\[{}]", "", text)
    open_depths: list[int] = []
    deepest = 0
    for ch in text:
        if ch == "{":
            open_depths.append(0)
        elif ch == "}" and open_depths:
            inner = open_depths.pop() + 1
            deepest = max(deepest, inner)
            if open_depths:
                open_depths[-1] = max(open_depths[-1], inner)
    return deepest


@FAST
@given(text=st.one_of(LATEX, TEXT))
@example(text="\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}")
@example(text="\\boxed{1 " * 500)
@example(text="\\boxed 5. \\boxed")
def test_last_boxed_returns_a_piece_of_the_text_or_none(text):
    answer = last_boxed(text)
    assert answer is None or (answer and answer == answer.strip() and answer in text)


def test_last_boxed_takes_linear_time_on_many_unclosed_boxes():
    t0 = time.perf_counter()
    assert last_boxed("\\boxed{1} " + "\\boxed{1 " * 2000) == "1"
    assert time.perf_counter() - t0 < 0.2


@FAST
@given(value=st.one_of(TEXT, LATEX, st.binary(max_size=40), st.text(alphabet="{}\\ a", max_size=60)),
       max_chars=st.integers(1, 80))
@example(value="{" * (MAX_BRACE_DEPTH + 1) + "}" * (MAX_BRACE_DEPTH + 1), max_chars=80)
@example(value="\x00\\boxed{3}\udcff", max_chars=80)
@example(value=b"\\boxed{4}\xff", max_chars=80)
def test_screen_cleans_any_input_and_rejects_exactly_the_pathological(value, max_chars):
    text, gold, why, cleaned = screen(value, value, max_chars)
    text.encode("utf-8")  # no lone surrogates left
    assert "\x00" not in text and text == gold
    original = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    assert cleaned == (text != original or (isinstance(value, bytes) and text.encode() != value))
    too_deep = _stack_depth(text) > MAX_BRACE_DEPTH
    assert braces_too_deep(text) == too_deep
    assert (why is not None) == (len(text) > max_chars or too_deep)


GOLDS = ["1", "\\frac{1}{2}", "(1, 2)", "x + 1", "\\pi", "@#!", "\\frac{1}{"]
UNPARSEABLE = {"@#!", "\\frac{1}{"}
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def verifier():
    with Verifier(timeout_s=TIMEOUT_S, workers=1, max_completion_chars=5000) as v:
        yield v


@SLOW
@given(items=st.lists(st.tuples(st.one_of(LATEX, TEXT), st.sampled_from(GOLDS)), min_size=1, max_size=6))
@example(items=[("\\boxed{@#!}", "@#!")])  # scored 1 before: the fast path never parsed the gold
@example(items=[("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1")])  # cost a full timeout before
@example(items=[("x" * 6000 + "\\boxed{1}", "1")])  # over the length cap: scored 1 before
@example(items=[("\x00\\boxed{1}\udcff", "1"), ("\\boxed{1 " * 500, "1")])
def test_the_verifier_scores_any_text_0_or_1_in_bounded_time_and_counts_it(verifier, items):
    completions, golds = [c for c, _ in items], [g for _, g in items]
    t0 = time.monotonic()
    rewards = verifier.score_batch(completions, golds)
    assert time.monotonic() - t0 < len(items) * (TIMEOUT_S + 1.0) + 2.0
    s = verifier.last_batch_stats
    assert set(rewards) <= {0.0, 1.0} and sum(rewards) == s.correct and s.calls == len(items)
    assert s.correct + s.parse_failures + s.timeouts + s.errors + s.rejected <= s.calls
    assert s.gold_errors <= s.errors
    assert all(r == 0.0 for r, g in zip(rewards, golds) if g in UNPARSEABLE)


@pytest.fixture(scope="module")
def gold_check():
    with GoldCheck(TIMEOUT_S, workers=1) as check:
        yield check


@SLOW
@given(gold=LATEX.filter(str.strip))
@example(gold="@#!")
@example(gold="\\frac{1}{")
@example(gold="a + b + c")  # MATH train: math-verify parses it as the string 'a +'
def test_a_gold_the_check_refuses_is_never_scored_1(verifier, gold_check, gold):
    refused = gold in gold_check.unparseable([gold])
    rewards = verifier.score_batch([f"\\boxed{{{gold}}}", gold, f"The answer is ${gold}$"], [gold] * 3)
    if refused:  # every item that reaches a worker fails on its gold before anything else
        s = verifier.last_batch_stats
        assert rewards == [0.0] * 3 and s.gold_errors + s.rejected + s.timeouts == 3, s

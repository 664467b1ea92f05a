"""lens.data on the real shared datasets, both public MATH schemas, GSM8K, the synthetic curriculum and the
registry of data sources."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network

import json
import logging
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens.data import (
    HENDRYCKS_CONFIGS,
    UNRATED_LEVEL,
    DataUnavailableError,
    LoadReport,
    Problem,
    canonical_form,
    last_boxed,
    load_dapo,
    load_gsm8k,
    load_math,
    load_problems_for,
    read_problems,
    register_source,
    registry,
    render_prompt,
    source_names,
    sources,
    synthetic_problems,
    synthetic_split_of,
    write_problems,
)
from lens.data.loaders import DAPO_PREFIX, DAPO_SUFFIX
from lens.params import PROJECT_ROOT, ParamsError, load_params
from tests.conftest import SHARED_DATA
from tests.helpers import offline_load_errors, shared_data_overrides

MATH500 = SHARED_DATA / "math" / "math500.jsonl"
MATH_TRAIN = SHARED_DATA / "math" / "train_subset.jsonl"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"

needs_shared = pytest.mark.skipif(not MATH500.exists(), reason="shared data not available")


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _consistent(report: LoadReport) -> bool:
    return report.rows == report.kept + sum(report.dropped.values())


# ---- last_boxed -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{1} first, then \boxed{2}", "2"),
    (r"\boxed{1} and finally \fbox{x^{2}}", "x^{2}"),
    (r"the answer is $\boxed 5$.", "5"),
    (r"the answer is \boxed 5.", "5"),
    (r"\boxed {7}", "7"),
    (r"\boxed{ 12 }", "12"),
    (r"\boxed{4} then a truncated \boxed{12", "4"),   # an unclosed box is no answer
    (r"\boxed{\boxed{4}}", r"\boxed{4}"),             # nested box is content of the outer one
    (r"\boxed{\left\{ x \mid x>0 \right.}", r"\left\{ x \mid x>0 \right."),  # escaped braces
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{}", None),
    (r"\boxedtext{3}", None),
    ("no box at all", None),
    ("", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@needs_shared
@pytest.mark.parametrize("path", [MATH500, MATH_TRAIN])
def test_last_boxed_matches_curated_answers_on_real_data(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(last_boxed(r["solution"]) == r["answer"].strip() for r in rows)


# ---- MATH -------------------------------------------------------------------------------------

@needs_shared
def test_math500_levels_and_answers():
    problems, report = load_math(str(MATH500), split="test")
    assert (report.rows, report.kept, report.dropped) == (500, 500, {})
    assert Counter(p.level for p in problems) == {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}
    first = problems[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.subject == "Precalculus" and first.level == 2
    assert len({p.id for p in problems}) == 500


@needs_shared
def test_math_train_subset_drops_unknown_level(caplog):
    with caplog.at_level(logging.WARNING, logger="lens.data"):
        problems, report = load_math(str(MATH_TRAIN))
    assert (report.rows, report.kept, report.dropped) == (3682, 3680, {"bad_level": 2})
    assert "bad_level" in caplog.text and "2 row(s)" in caplog.text
    assert {p.level for p in problems} == {1, 2, 3, 4, 5}
    assert Counter(p.level for p in problems)[1] == 267
    assert report.summary() == f"{MATH_TRAIN}: 3682 rows, 3680 kept, dropped: bad_level=2"


@needs_shared
def test_math_level_filter_is_counted_apart_from_defects(caplog):
    with caplog.at_level(logging.WARNING, logger="lens.data"):
        problems, report = load_math(str(MATH_TRAIN), levels=[1, 2])
    assert report.dropped == {"bad_level": 2, "level_filtered": 3680 - 267 - 710}
    assert report.kept == len(problems) == 267 + 710
    assert _consistent(report)
    assert "level_filtered" not in caplog.text  # a selection, not a warning


HENDRYCKS_ROWS = [
    {"problem": "Nested?", "level": "Level 3", "type": "Algebra",
     "solution": r"First $\boxed{1}$, then $\boxed{\frac{a^{2}}{\sqrt{b}}}$."},
    {"problem": "Fbox?", "level": "Level 1", "type": "Geometry", "solution": r"So it is $\fbox{42}$"},
    {"problem": "Bare?", "level": "Level 5", "type": "Number Theory", "solution": r"Thus $\boxed 7$."},
    {"problem": "No box?", "level": "Level 2", "type": "Algebra", "solution": "The answer is 3."},
    {"problem": "Unknown level?", "level": "Level ?", "type": "Algebra", "solution": r"\boxed{9}"},
    {"problem": "", "level": "Level 2", "type": "Algebra", "solution": r"\boxed{9}"},
    {"problem": "No level field", "type": "Algebra", "solution": r"\boxed{9}"},
]


def _check_hendrycks(problems: list[Problem], report: LoadReport) -> None:
    assert [p.answer for p in problems] == [r"\frac{a^{2}}{\sqrt{b}}", "42", "7"]
    assert [p.level for p in problems] == [3, 1, 5]
    assert [p.subject for p in problems] == ["Algebra", "Geometry", "Number Theory"]
    assert report.dropped == {"no_answer": 1, "bad_level": 2, "missing_problem": 1}
    assert report.rows == 7 and report.kept == 3 and _consistent(report)
    assert len({p.id for p in problems}) == 3


def test_hendrycks_schema_jsonl(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "hendrycks.jsonl", HENDRYCKS_ROWS)
    with caplog.at_level(logging.WARNING, logger="lens.data"):
        problems, report = load_math(str(path))
    _check_hendrycks(problems, report)
    assert problems[0].id == "hendrycks-000000"  # no unique_id: stable, index-based
    for reason in ("no_answer", "bad_level", "missing_problem"):
        assert reason in caplog.text


def test_hendrycks_schema_parquet(tmp_path):
    path = tmp_path / "hendrycks.parquet"
    pq.write_table(pa.Table.from_pylist(HENDRYCKS_ROWS), path)
    _check_hendrycks(*load_math(str(path)))


def test_math500_schema_parquet_with_int_levels(tmp_path):
    rows = [{"problem": "p1", "solution": r"\boxed{2}", "answer": "2", "subject": "Algebra", "level": 4,
             "unique_id": "test/algebra/1.json"},
            {"problem": "p2", "solution": r"\boxed{6}", "answer": "", "subject": "Algebra", "level": 6,
             "unique_id": "test/algebra/2.json"},
            {"problem": "p3", "solution": r"\boxed{5}", "answer": "", "subject": "Algebra", "level": 2,
             "unique_id": "test/algebra/1.json"}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems, report = load_math(str(path))
    assert problems == [Problem("test/algebra/1.json", "p1", "2", 4, "Algebra")]
    assert report.dropped == {"bad_level": 1, "duplicate_id": 1}


def test_answer_column_wins_and_empty_answer_falls_back_to_box(tmp_path):
    rows = [{"problem": "a", "level": 1, "answer": "16", "solution": r"\boxed{4 \times 4 = 16}"},
            {"problem": "b", "level": 1, "answer": " ", "solution": r"\boxed{8}"}]
    problems, _ = load_math(str(_write_jsonl(tmp_path / "a.jsonl", rows)))
    assert [p.answer for p in problems] == ["16", "8"]


def test_bad_json_lines_are_counted(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "ok", "level": 1, "answer": "1"}\n{not json\n[1, 2]\n\n')
    problems, report = load_math(str(path))
    assert len(problems) == 1 and report.dropped == {"bad_json": 2} and report.rows == 3


def test_missing_and_unsupported_local_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_math(str(tmp_path / "absent.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_math(str(tmp_path / "x.csv"))


def test_hendrycks_hub_loads_every_subject_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(source, config, split):
        calls.append((source, config, split))
        return datasets.Dataset.from_list([{"problem": f"{config} problem", "level": "Level 2", "type": config,
                                            "solution": r"\boxed{1}"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, report = load_math("EleutherAI/hendrycks_math", split="train")
    assert calls == [("EleutherAI/hendrycks_math", c, "train") for c in HENDRYCKS_CONFIGS]
    assert [p.subject for p in problems] == list(HENDRYCKS_CONFIGS)
    assert len({p.id for p in problems}) == len(problems) == report.kept == 7


def test_math500_hub_id_uses_single_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(source, config, split):
        calls.append((source, config, split))
        return datasets.Dataset.from_list([{"problem": "p", "level": 3, "subject": "Algebra", "answer": "5",
                                            "solution": "", "unique_id": "test/algebra/9.json"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, _ = load_math("HuggingFaceH4/MATH-500", split="test")
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert problems == [Problem("test/algebra/9.json", "p", "5", 3, "Algebra")]


# ---- GSM8K ------------------------------------------------------------------------------------

@needs_shared
def test_gsm8k_real_files():
    train, report = load_gsm8k(str(GSM8K_TRAIN))
    assert (report.rows, report.kept, report.dropped) == (7473, 7473, {})
    assert train[0] == Problem("gsm8k-train-000000", train[0].problem, "72", 1, "gsm8k")
    assert train[0].problem.startswith("Natalia sold clips")
    assert all(re.fullmatch(r"-?[\d.]+", p.answer) for p in train)  # commas stripped
    test, report = load_gsm8k(str(GSM8K_TEST), split="test")
    assert report.kept == 1319 and not {p.id for p in test} & {p.id for p in train}


def test_gsm8k_answer_forms(tmp_path):
    rows = [{"question": "full", "answer": "48/2 = <<48/2=24>>24\n#### 1,080"},
            {"question": "bare", "answer": "-7"},
            {"question": "two markers", "answer": "#### 3\nnote\n#### 4"},
            {"question": "no value", "answer": "a solution with no final marker"},
            {"question": "empty marker", "answer": "work\n#### "},
            {"question": "", "answer": "#### 5"}]
    problems, report = load_gsm8k(str(_write_jsonl(tmp_path / "g.jsonl", rows)))
    assert [(p.problem, p.answer) for p in problems] == [("full", "1080"), ("bare", "-7"), ("two markers", "4")]
    assert report.dropped == {"no_answer": 2, "missing_problem": 1}
    assert all(p.level == 1 and p.subject == "gsm8k" for p in problems)


def test_gsm8k_hub_uses_main_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(source, config, split):
        calls.append((source, config, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 12"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, _ = load_gsm8k("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert problems == [Problem("gsm8k-gsm8k-test-000000", "q", "12", 1, "gsm8k")]


# ---- synthetic --------------------------------------------------------------------------------

SYNTHETIC_SHAPES = {  # the grading: operand sizes and operators per level
    1: r"\d\+\d",
    2: r"(\d\d\+\d|\d\+\d\d)",
    3: r"\d\d[+-]\d\d",
    4: r"(\d\d\*\d|\d\*\d\d)",
}
LEVEL5_SHAPE = r"(\d\d\*\d|\d\*\d\d|\d\d)([+-](\d\d\*\d|\d\*\d\d|\d\d)){1,2}"


@pytest.fixture(scope="module")
def synthetic():
    return {split: synthetic_problems(split, n, seed=7) for split, n in (("train", 300), ("eval", 40))}


def test_synthetic_is_deterministic_and_seeded(synthetic):
    assert synthetic_problems("train", 300, seed=7) == synthetic["train"]
    assert synthetic_problems("eval", 40, seed=7) == synthetic["eval"]
    assert synthetic_problems("train", 300, seed=8) != synthetic["train"]


def test_synthetic_train_and_eval_are_disjoint(synthetic):
    train = {(p.level, p.problem) for p in synthetic["train"]}
    evals = {(p.level, p.problem) for p in synthetic["eval"]}
    assert not train & evals
    assert all(synthetic_split_of(p.problem, 7) == "eval" for p in synthetic["eval"])
    assert all(synthetic_split_of(p.problem, 7) == "train" for p in synthetic["train"])


def test_canonical_form_identifies_expressions_up_to_commutativity():
    assert canonical_form("3*12") == canonical_form("12*3") == "+3*12"
    assert canonical_form("7+3") == canonical_form("3+7")
    assert canonical_form("12+37*8-45") == canonical_form("37*8+12-45") == canonical_form("8*37+12-45")
    assert canonical_form("45-37*8") != canonical_form("37*8-45")  # a different sign is a different problem
    assert canonical_form("52-17") != canonical_form("17-52")


def test_no_eval_problem_has_a_commuted_twin_in_train():
    """With the default seeds, 119 of 273 eval problems had a twin in train (`3*12` vs `12*3`) when the split
    was decided on the string; the split is now decided on the canonical form."""
    syn = load_params("tiny").data.synthetic
    train = synthetic_problems("train", syn.train_per_level, syn.seed)
    evals = synthetic_problems("eval", syn.eval_per_level, syn.seed)
    twins = [p.problem for p in evals if canonical_form(p.problem) in {canonical_form(t.problem) for t in train}]
    assert not twins, f"{len(twins)} of {len(evals)} eval problems have a twin in train, e.g. {twins[:5]}"
    assert all(synthetic_split_of("3*12", seed) == synthetic_split_of("12*3", seed) for seed in range(50))


def test_synthetic_answers_shapes_and_ids(synthetic):
    for split, problems in synthetic.items():
        for p in problems:
            shape = SYNTHETIC_SHAPES.get(p.level, LEVEL5_SHAPE)
            assert re.fullmatch(shape, p.problem), (p.level, p.problem)
            assert set(p.problem) <= set(string.printable)
            assert p.answer == str(eval(p.problem))  # noqa: S307 - digits and +-* only (checked above)
            assert p.subject == "arithmetic"
            assert re.fullmatch(rf"syn-L{p.level}-{split}-\d{{6}}", p.id)
        assert len({p.id for p in problems}) == len(problems)
    assert any(p.answer.startswith("-") for p in synthetic["train"])  # negatives exist (L3, L5)


def test_synthetic_difficulty_is_graded(synthetic):
    by_level = {lv: [int(p.answer) for p in synthetic["train"] if p.level == lv] for lv in range(1, 6)}
    largest = [max(abs(a) for a in by_level[lv]) for lv in range(1, 6)]
    assert largest == sorted(largest) and largest[0] <= 18 and largest[-1] > 500
    level5_ops = Counter(len(re.findall(r"[+-]", p.problem)) for p in synthetic["train"] if p.level == 5)
    assert set(level5_ops) == {1, 2}  # two- and three-term expressions


def test_synthetic_small_levels_repeat_in_train_and_shrink_in_eval():
    train = synthetic_problems("train", 500, seed=3, levels=[1])
    evals = synthetic_problems("eval", 64, seed=3, levels=[1])
    assert len(train) == 500  # filled with repeats of the ~80 train pairs
    train_exprs, eval_exprs = {p.problem for p in train}, {p.problem for p in evals}
    assert len(evals) == len(eval_exprs) < 64  # eval stays distinct
    assert train_exprs | eval_exprs == {f"{a}+{b}" for a in range(10) for b in range(10)}
    assert not train_exprs & eval_exprs


def test_synthetic_per_level_mapping_and_bad_arguments():
    problems = synthetic_problems("eval", {3: 5, 5: 2}, seed=0, levels=[3, 5])
    assert Counter(p.level for p in problems) == {3: 5, 5: 2}
    with pytest.raises(ValueError, match="level 4"):
        synthetic_problems("eval", {3: 5}, seed=0, levels=[3, 4])
    with pytest.raises(ValueError):
        synthetic_problems("test", 5, seed=0)
    with pytest.raises(ValueError):
        synthetic_problems("train", 5, seed=0, levels=[6])


# ---- persistence and prompts ------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    problems = [Problem("a/1", "Find $x$ if \\(x^2=4\\) — ünïcode", "\\pm 2", 3, "Algebra"),
                *synthetic_problems("eval", 3, seed=0, levels=[5])]
    path = tmp_path / "nested" / "dir" / "eval.jsonl"
    write_problems(path, problems)
    assert read_problems(path) == problems
    write_problems(path, problems[:1])  # overwrite in place, no temp files left behind
    assert read_problems(path) == problems[:1]
    assert [p.name for p in path.parent.iterdir()] == ["eval.jsonl"]


# The prompts rendered from problems: tests/test_prompt.py.


# ---- params-driven selection ------------------------------------------------------------------

def test_load_problems_for_tiny_profile():
    params = load_params("tiny", ["data.synthetic.train_per_level=50", "data.synthetic.eval_per_level=30",
                                  "data.max_eval_problems_per_level=20"])
    train, (train_report,) = load_problems_for(params, "train")
    evals, (eval_report,) = load_problems_for(params, "eval")
    assert Counter(p.level for p in train) == {lv: 50 for lv in range(1, 6)}
    assert max(Counter(p.level for p in evals).values()) == 20
    assert eval_report.dropped["capped"] > 0 and _consistent(eval_report) and _consistent(train_report)
    assert not {p.problem for p in train} & {p.problem for p in evals}
    assert load_problems_for(params, "eval")[0] == evals
    with pytest.raises(ValueError):
        load_problems_for(params, "test")


@needs_shared
def test_load_problems_for_math_caps_are_seeded_and_per_level():
    overrides = ["data.train_source=math", "data.eval_source=math", "data.levels=[1,2]",
                 "data.max_eval_problems_per_level=10", "data.max_train_problems=100", *shared_data_overrides()]
    params = load_params("tiny", overrides)
    evals, (report,) = load_problems_for(params, "eval")
    assert Counter(p.level for p in evals) == {1: 10, 2: 10}
    assert report.dropped == {"level_filtered": 367, "capped": 133 - 20} and report.kept == 20
    train, (train_report,) = load_problems_for(params, "train")
    assert len(train) == 100 and {p.level for p in train} <= {1, 2}
    assert train_report.dropped["bad_level"] == 2 and _consistent(train_report)
    assert load_problems_for(params, "train")[0] == train  # deterministic
    reseeded = load_problems_for(load_params("tiny", [*overrides, "run.seed=1"]), "train")[0]
    assert reseeded != train
    position = {p.id: i for i, p in enumerate(load_math(str(MATH_TRAIN))[0])}
    positions = [position[p.id] for p in train]
    assert positions == sorted(positions)  # the cap selects; it does not reorder


@needs_shared
def test_load_problems_for_smollm2_mixture():
    params = load_params("smollm2", ["data.synthetic.train_per_level=100", "data.max_train_problems=300",
                                     *shared_data_overrides()])
    train, reports = load_problems_for(params, "train")
    assert len(train) == 300 and len({p.id for p in train}) == 300
    assert [r.source.split("(")[0].rsplit("/", 1)[-1] for r in reports] == [
        "synthetic", "train.jsonl", "train_subset.jsonl"]
    assert sum(r.kept for r in reports) == 300 and all(_consistent(r) for r in reports)
    assert {p.subject for p in train} >= {"arithmetic", "gsm8k"}
    assert {p.level for p in train} == {1, 2}  # synthetic L2 stays; MATH restricted to data.levels=[1]
    assert all(p.level == 1 for p in train if p.subject not in ("arithmetic",))
    evals, eval_reports = load_problems_for(params, "eval")
    per_source = [r.kept for r in eval_reports]
    assert per_source[1] == 64 and per_source[2] == 43  # GSM8K capped at 64, MATH-500 has 43 level-1 rows
    assert all(r.as_dict()["kept"] == r.kept for r in eval_reports)


def test_hub_ids_pass_through_unresolved(monkeypatch):
    seen = []
    monkeypatch.setattr(sources, "load_math", lambda source, split, levels: (seen.append((source, split)) or [],
                                                                        LoadReport(source, 0, 0, {})))
    monkeypatch.setattr(sources, "load_dapo", lambda source, split: (seen.append((source, split)) or [],
                                                                   LoadReport(source, 0, 0, {})))
    params = load_params("paper", ["data.max_prompt_tokens=null"])
    load_problems_for(params, "eval")
    assert seen == [("HuggingFaceH4/MATH-500", "test")]
    load_problems_for(params, "train")  # MATH train, DAPO, and MATH-500 to drop DAPO's copies of it
    assert seen[1:] == [("EleutherAI/hendrycks_math", "train"), ("BytedTsinghua-SIA/DAPO-Math-17k", "train"),
                        ("HuggingFaceH4/MATH-500", "test")]


# ---- DAPO-Math-17k, the paper's mix, and the prompt budget ---------------------------------------
# Small files in the real schemas: DAPO's verl rows (a chat-list prompt wrapping the problem in DAPO's own
# instruction, reward_model.ground_truth, extra_info.index), MATH-500's and hendrycks_math's.

MATH500_ROW = {"problem": "If $f(x) = 2x+1$, what is $f(3)$?", "solution": "$f(3)=\\boxed{7}$.", "answer": "7",
               "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}
MATH_TRAIN_ROWS = [
    {"problem": "If $x + 3 = 5$, what is $x$?", "level": "Level 1", "type": "Algebra",
     "solution": "$x = \\boxed{2}$."},
    {"problem": "What is $6 \\cdot 7$?", "level": "Level 2", "type": "Prealgebra", "solution": "$\\boxed{42}$"},
]


def _dapo_row(problem: str, answer: str, index: str) -> dict:
    return {"data_source": "math_dapo", "ability": "MATH",
            "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


DAPO_ROWS = [
    *[_dapo_row("Find the number of positive divisors of $2024$.", "12", "a1")] * 3,  # the hub file repeats
    _dapo_row("Find the number of  positive divisors of 2024.", "12", "a2"),  # the same, spaced differently
    _dapo_row("If f(x) = 2x+1, what is f(3)?", "7", "b"),                     # a MATH-500 problem
    _dapo_row("How many primes are below $30$?", "", "c"),                    # no answer
    _dapo_row("If x+3 = 5, what is x?", "2", "d"),                            # a MATH train problem
    _dapo_row("Let $n$ be the least integer with $n^2 > 2000$. Find $n$.", "45", "e"),
]


def _write_parquet(path: Path, rows: list) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def paper_files(tmp_path):
    return {"data.dapo_train_path": _write_parquet(tmp_path / "dapo-math-17k.parquet", DAPO_ROWS),
            "data.math_eval_path": _write_jsonl(tmp_path / "math500.jsonl", [MATH500_ROW]),
            "data.math_train_path": _write_jsonl(tmp_path / "math_train.jsonl", MATH_TRAIN_ROWS)}


def _paper_params(tmp_path, files, *extra):
    """The paper profile on the small files; its tokenizer is not on this machine (offline), so chars/4."""
    return load_params("paper", [f"run.output_root={tmp_path / 'runs'}", *(f"{k}={v}" for k, v in files.items()),
                                 "model.name_or_path=lens-tests/no-such-model", "eval.extra_sets=[]", *extra])


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_dapo_rows_are_normalised_and_deduplicated(tmp_path, suffix):
    path = tmp_path / f"dapo{suffix}"
    _write_parquet(path, DAPO_ROWS) if suffix == ".parquet" else _write_jsonl(path, DAPO_ROWS)
    problems, report = load_dapo(str(path))
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        ("dapo-a1", "Find the number of positive divisors of $2024$.", "12"),
        ("dapo-b", "If f(x) = 2x+1, what is f(3)?", "7"),
        ("dapo-d", "If x+3 = 5, what is x?", "2"),
        ("dapo-e", "Let $n$ be the least integer with $n^2 > 2000$. Find $n$.", "45")]
    assert {(p.level, p.subject) for p in problems} == {(UNRATED_LEVEL, "dapo")}  # DAPO has no difficulty levels
    assert report.dropped == {"duplicate_problem": 3, "no_answer": 1} and _consistent(report)
    assert "normalised text" in report.rules["duplicate_problem"]


def test_dapo_source_drops_the_eval_sets_problems_and_has_no_eval_split(tmp_path, paper_files):
    params = _paper_params(tmp_path, paper_files, "data.train_source=dapo", "data.levels=[1]")
    train, (report,) = load_problems_for(params, "train")
    assert [p.id for p in train] == ["dapo-a1", "dapo-d", "dapo-e"]  # unrated: data.levels does not filter them
    assert report.dropped == {"duplicate_problem": 3, "no_answer": 1, "duplicate_of_eval": 1}
    assert report.rules["duplicate_of_eval"].endswith("data.eval_source=math") and _consistent(report)
    with pytest.raises(ValueError, match="only a train split: set data.eval_source"):
        load_problems_for(_paper_params(tmp_path, paper_files, "data.eval_source=dapo"), "eval")


def test_the_paper_mix_is_math_train_plus_dapo_and_prepare_counts_every_drop(tmp_path, paper_files):
    from lens import stages

    params = _paper_params(tmp_path, paper_files)
    assert params.data.train_source == "math_dapo" and params.data.max_prompt_tokens == 1024
    summary = stages.prepare(params)
    train = read_problems(params.data_dir / "train.jsonl")
    assert [p.id for p in train] == ["math_train-000000", "math_train-000001", "dapo-a1", "dapo-e"]
    assert [p.id for p in read_problems(params.data_dir / "eval.jsonl")] == ["test/algebra/1.json"]
    report = json.loads((params.data_dir / "report.json").read_text())
    assert report == summary and report["splits"]["train"]["levels"] == {"0": 2, "1": 1, "2": 1}
    _, dapo_report = report["splits"]["train"]["sources"]
    assert dapo_report["dropped"] == {"duplicate_problem": 3, "no_answer": 1, "duplicate_of_eval": 1,
                                      "duplicate_of_math_train": 1}
    assert dapo_report["rules"]["prompt_too_long"] == (
        "prompt longer than 1024 characters/4 of the user message (the model's tokenizer was not available)")


def test_prompts_over_the_budget_are_dropped_and_counted(tmp_path, paper_files):
    # chars/4 of "<problem> <instruction>": the instruction alone is 71 characters, 18 "tokens".
    lengths = {p["problem"]: -(-(len(p["problem"]) + 72) // 4) for p in MATH_TRAIN_ROWS}
    budget = min(lengths.values())
    params = _paper_params(tmp_path, paper_files, f"data.max_prompt_tokens={budget}", "data.train_source=math")
    train, (report,) = load_problems_for(params, "train")
    assert [p.problem for p in train] == [q for q, n in lengths.items() if n <= budget] and len(train) == 1
    assert report.dropped == {"prompt_too_long": 1} and _consistent(report)


def test_the_budget_counts_tokens_of_the_profiles_tokenizer(tmp_path):
    """The tiny profile's character tokenizer: `Q: 12+34\nA: ` is 12 tokens; L1 (10) and L2/L4 (11) fit in 11."""
    params = load_params("tiny", ["data.synthetic.train_per_level=20", "data.max_prompt_tokens=11"])
    train, (report,) = load_problems_for(params, "train")
    assert {p.level for p in train} == {1, 2, 4} and report.dropped == {"prompt_too_long": 40}
    assert report.rules["prompt_too_long"] == "prompt longer than 11 tokens of the warm_start tokenizer, plain template"


def test_a_chat_template_prompt_is_measured_as_rendered(tmp_path):
    from lens.data.prompt_budget import prompt_measure
    from tests.test_prompt import chatml_tokenizer

    tok = chatml_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    params = load_params("paper", [f"model.name_or_path={tmp_path / 'tok'}"])
    measure, unit = prompt_measure(params)
    problems = synthetic_problems("eval", 2, seed=0, levels=[3])
    rendered = [render_prompt(p, tok, params.model.prompt) for p in problems]
    assert measure(problems) == [len(tok(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    assert unit == f"tokens of the {tmp_path / 'tok'} tokenizer, chat template"


# ---- the registry of data sources and the default datasets -------------------------------------

def test_builtin_sources_are_registered_and_params_accept_only_registered_names():
    assert set(source_names()) >= {"synthetic", "math", "gsm8k", "mixture", "dapo", "math_dapo"}
    for key in ("train_source", "eval_source"):
        with pytest.raises(ParamsError, match=rf"data\.{key}: .*unknown data source 'maths'.*dapo, gsm8k, math, math_dapo, mixture"):
            load_params("tiny", [f"data.{key}=maths"])


def test_a_registered_source_is_selectable_and_dispatched(monkeypatch):
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))  # registrations end with the test

    def two_problems(params, split):
        problems = [Problem(f"mine-{split}-{i}", f"{i}+{i}", str(2 * i), 1, "mine") for i in range(2)]
        return [registry.SourcePart(problems, LoadReport("mine", 2, 2, {}))]

    register_source("mine", two_problems)
    with pytest.raises(ValueError, match="already registered"):
        register_source("mine")(lambda params, split: [])
    params = load_params("tiny", ["data.train_source=mine", "data.eval_source=mine"])
    evals, (report,) = load_problems_for(params, "eval")
    assert [p.id for p in evals] == ["mine-eval-0", "mine-eval-1"] and report.source == "mine"


def test_listing_sources_imports_no_dataset_or_tensor_library():
    code = ("import sys; from lens.data import source_names; source_names(); "
            "print(sorted(m for m in ('datasets', 'torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_datasets_are_hub_ids_never_paths_outside_the_repository():
    data = load_params("tiny").data
    assert (data.math_train_path, data.math_eval_path) == ("EleutherAI/hendrycks_math", "HuggingFaceH4/MATH-500")
    assert data.gsm8k_train_path == data.gsm8k_eval_path == "openai/gsm8k"
    for profile in ("tiny", "smollm2", "paper"):
        paths = [v for k, v in load_params(profile).data.model_dump().items() if k.endswith("_path")]
        assert not [p for p in paths if ".." in p or p.startswith("/")], (profile, paths)


OFFLINE_PROBE = """
import json
from lens.data import DataUnavailableError, load_problems_for
from lens.params import load_params

errors = {}
for source, split in (("math", "train"), ("math", "eval"), ("gsm8k", "train"), ("mixture", "eval"),
                      ("dapo", "train")):
    try:
        load_problems_for(load_params("tiny", [f"data.{split}_source={source}"]), split)
    except DataUnavailableError as exc:
        errors[f"{source}/{split}"] = str(exc)
print(json.dumps(errors))
"""


def test_offline_default_hub_datasets_not_in_the_cache_fail_naming_the_key(tmp_path):
    """The defaults are hub ids: offline with an empty cache (a fresh HF_HOME), each fails with its key."""
    errors = offline_load_errors(tmp_path, OFFLINE_PROBE)
    keys = {"math/train": "math_train_path", "math/eval": "math_eval_path", "gsm8k/train": "gsm8k_train_path",
            "mixture/eval": "gsm8k_eval_path",  # a mixture reads GSM8K before MATH
            "dapo/train": "dapo_train_path"}
    assert set(errors) == set(keys)
    for case, key in keys.items():
        assert re.match(rf"data\.{key}: cannot load '[\w/-]+' \(ConnectionError", errors[case]), errors[case]
        assert f"set data.{key}=<a local .jsonl or .parquet file>" in errors[case]
        assert "HF_HUB_OFFLINE is set" in errors[case]


def test_offline_unknown_hub_dataset_names_the_key():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: the test never reaches the network
    params = load_params("tiny", ["data.train_source=gsm8k", "data.gsm8k_train_path=lens-tests/no-such-dataset"])
    with pytest.raises(DataUnavailableError, match=r"^data\.gsm8k_train_path: .*no-such-dataset.*\.parquet"):
        load_problems_for(params, "train")


def test_missing_local_file_names_the_key(tmp_path):
    params = load_params("tiny", ["data.eval_source=math", f"data.math_eval_path={tmp_path / 'absent.jsonl'}"])
    with pytest.raises(FileNotFoundError, match=r"^data\.math_eval_path: cannot load .*absent\.jsonl"):
        load_problems_for(params, "eval")


def test_broken_local_files_are_named_or_their_lines_counted_with_line_numbers(tmp_path, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"{empty} is empty"):
        load_math(str(empty))
    mixed = tmp_path / "mixed.jsonl"
    good = b'{"problem": "ok", "level": 1, "answer": "1"}'
    mixed.write_bytes(good + b"\n" + b'{"problem": "caf\xe9", "level": 1, "answer": "2"}\n' + b"{not json\n")
    with caplog.at_level(logging.WARNING):
        problems, report = load_math(str(mixed))
    assert len(problems) == 1 and report.dropped == {"not_utf8": 1, "bad_json": 1}
    assert "line 2" in caplog.text and "line 3" in caplog.text  # 1-based line numbers, not row indices


def test_an_oversized_problem_is_dropped_and_counted(tmp_path):
    from lens.data.loaders import MAX_PROBLEM_CHARS

    rows = [{"problem": "x" * (MAX_PROBLEM_CHARS + 1), "level": 1, "answer": "1"},
            {"problem": "1+1", "level": 1, "answer": "2"}]
    problems, report = load_math(str(_write_jsonl(tmp_path / "big.jsonl", rows)))
    assert [p.problem for p in problems] == ["1+1"] and report.dropped == {"oversized": 1}

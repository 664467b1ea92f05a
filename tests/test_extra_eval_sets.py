"""AIME 2024 and AMC 2023 as extra evaluation sets (eval.extra_sets): their loaders on small files in the hub
datasets' schemas, prepare's data/eval_<name>.jsonl, and the evaluate stage's "sets" in eval.json."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens import stages
from lens.data import (
    UNRATED_LEVEL,
    DataUnavailableError,
    integer_answer,
    load_problems_for,
    read_problems,
)
from lens.evaluate import eval_metrics, read_eval
from lens.params import ParamsError, load_params
from tests.helpers import offline_load_errors, random_policy, small_params

AOPS = "https://artofproblemsolving.com/wiki/index.php/"

# HuggingFaceH4/aime_2024: id int64, problem, solution, answer (a string), url, year (a string). The
# 2023 row stands for a multi-year dump such as AI-MO/aimo-validation-aime.
AIME_SCHEMA = pa.schema([("id", pa.int64()), ("problem", pa.string()), ("solution", pa.string()),
                         ("answer", pa.string()), ("url", pa.string()), ("year", pa.string())])
AIME_ROWS = [
    {"id": 60, "problem": "Find the remainder when 2024 is divided by 1000.", "solution": "It is $\\boxed{24}$.",
     "answer": "24", "url": AOPS + "2024_AIME_I_Problems/Problem_1", "year": "2024"},
    {"id": 61, "problem": "Find 3 times 11.", "solution": "3*11 = $\\boxed{033}$.",
     "answer": "033", "url": AOPS + "2024_AIME_I_Problems/Problem_2", "year": "2024"},
    {"id": 75, "problem": "Find 2 + 2.", "solution": "", "answer": "4",
     "url": AOPS + "2023_AIME_II_Problems/Problem_1", "year": "2023"},
]
# AI-MO/aimo-validation-amc: id int64, problem, answer float64, url; AMC 12 2022 and 2023 (year only in the url).
AMC_SCHEMA = pa.schema([("id", pa.int64()), ("problem", pa.string()), ("answer", pa.float64()), ("url", pa.string())])
AMC_ROWS = [
    {"id": 0, "problem": "What is 71 times 2?", "answer": 142.0, "url": AOPS + "2023_AMC_12A_Problems/Problem_12"},
    {"id": 1, "problem": "What is 30 minus 3?", "answer": 27.0, "url": AOPS + "2023_AMC_12B_Problems/Problem_4"},
    {"id": 2, "problem": "What is 5 plus 5?", "answer": 10.0, "url": AOPS + "2022_AMC_12A_Problems/Problem_3"},
]


def _parquet(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def contest_files(tmp_path) -> list[str]:
    """data.*_path overrides pointing both contests at local files in their hub schemas."""
    aime = _parquet(tmp_path / "aime_2024.parquet", AIME_ROWS, AIME_SCHEMA)
    amc = _parquet(tmp_path / "aimo-validation-amc.parquet", AMC_ROWS, AMC_SCHEMA)
    return [f"data.aime2024_path={aime}", f"data.amc2023_path={amc}"]


@pytest.mark.parametrize(("value", "expected"), [
    (142.0, "142"), ("142.0", "142"), (27, "27"), ("033", "33"), ("0", "0"), ("-5.0", "-5"),
    ("\\frac{1}{2}", "\\frac{1}{2}"), (2.5, "2.5"), (None, ""), (float("nan"), ""),
])
def test_contest_answers_are_normalised_integers(value, expected):
    assert integer_answer(value) == expected


def test_aime_rows_become_unrated_problems_with_ids_from_the_id_column(contest_files):
    params = load_params("tiny", contest_files)
    problems, (report,) = load_problems_for(params, "eval", "aime2024")
    assert [(p.id, p.answer, p.level, p.subject) for p in problems] == [
        ("aime2024-60", "24", UNRATED_LEVEL, "aime2024"), ("aime2024-61", "33", UNRATED_LEVEL, "aime2024")]
    assert problems[0].problem == AIME_ROWS[0]["problem"]
    assert (report.rows, report.kept, report.dropped) == (3, 2, {"other_year": 1})
    assert "2024" in report.rules["other_year"]


def test_amc_float_answers_become_integers_and_2022_rows_are_left_out(contest_files, tmp_path):
    params = load_params("tiny", contest_files)
    problems, (report,) = load_problems_for(params, "eval", "amc2023")
    assert [(p.id, p.answer, p.level) for p in problems] == [("amc2023-0", "142", UNRATED_LEVEL),
                                                            ("amc2023-1", "27", UNRATED_LEVEL)]
    assert (report.rows, report.kept, report.dropped) == (3, 2, {"other_year": 1})
    # The same rows as .jsonl (the answer a JSON float) and without an id column: ids from the row index.
    jsonl = tmp_path / "amc.jsonl"
    jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n" for r in AMC_ROWS))
    problems, _ = load_problems_for(load_params("tiny", [f"data.amc2023_path={jsonl}"]), "eval", "amc2023")
    assert [(p.id, p.answer) for p in problems] == [("amc2023-amc-000000", "142"), ("amc2023-amc-000001", "27")]


def test_contests_are_evaluation_sets_only(contest_files):
    params = load_params("tiny", [*contest_files, "data.train_source=aime2024"])
    with pytest.raises(ValueError, match=r"aime2024 is an evaluation set .*data\.train_source"):
        load_problems_for(params, "train")


def test_unknown_or_repeated_extra_sets_are_refused_naming_the_key():
    with pytest.raises(ParamsError, match=r"eval\.extra_sets: .*unknown data sources \['aime2025'\]"):
        load_params("tiny", ["eval.extra_sets=[aime2024,aime2025]"])
    with pytest.raises(ParamsError, match=r"eval\.extra_sets: .*once"):
        load_params("tiny", ["eval.extra_sets=[amc2023,amc2023]"])


def test_paper_profile_evaluates_aime_and_amc_from_hub_ids():
    assert load_params("tiny").eval.extra_sets == []
    paper = load_params("paper")
    assert paper.eval.extra_sets == ["aime2024", "amc2023"]
    assert (paper.data.aime2024_path, paper.data.amc2023_path) == ("HuggingFaceH4/aime_2024",
                                                                   "AI-MO/aimo-validation-amc")


def test_prepare_writes_each_extra_set_and_counts_it_in_the_report(tmp_path, contest_files):
    params = small_params(tmp_path, *contest_files, "eval.extra_sets=[aime2024,amc2023]")
    summary = stages.prepare(params)
    assert [p.id for p in read_problems(params.data_dir / "eval_aime2024.jsonl")] == ["aime2024-60", "aime2024-61"]
    assert [p.answer for p in read_problems(params.data_dir / "eval_amc2023.jsonl")] == ["142", "27"]
    report = json.loads((params.data_dir / "report.json").read_text())
    assert report == json.loads(json.dumps(summary))
    assert set(report["splits"]) == {"train", "eval", "eval_aime2024", "eval_amc2023"}
    amc = report["splits"]["eval_amc2023"]
    assert (amc["problems"], amc["levels"]) == (2, {str(UNRATED_LEVEL): 2})
    assert amc["sources"][0]["dropped"] == {"other_year": 1}


def _without_sets_and_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("sets", "seconds")}


def test_evaluate_reports_extra_sets_under_sets_and_leaves_the_main_set_as_it_was(tmp_path, contest_files):
    plain = small_params(tmp_path, *contest_files)
    params = small_params(tmp_path, *contest_files, "eval.extra_sets=[aime2024]")
    policy = random_policy(params)
    stages.prepare(params)
    without = stages.evaluate(plain, "grpo", model_path=policy, out_path=tmp_path / "plain.json")
    summary = stages.evaluate(params, "grpo", model_path=policy)

    written = read_eval(params.algo_dir("grpo") / "eval.json")
    assert set(written["sets"]) == {"aime2024"}
    aime = written["sets"]["aime2024"]
    assert [r["id"] for r in aime["problems"]] == ["aime2024-60", "aime2024-61"]
    assert aime["overall"]["samples_per_problem"] == params.eval.samples_per_problem
    assert aime["sampling"] == written["sampling"]  # same sampling settings as the main set
    # The main set stays at the top level, exactly as without extra sets (the same seed, the same samples).
    assert "sets" not in without
    assert _without_sets_and_timing(written) == _without_sets_and_timing(read_eval(tmp_path / "plain.json"))

    metrics = eval_metrics(summary)
    assert metrics["eval/aime2024/acc"] == aime["overall"]["acc"]
    assert {f"eval/aime2024/pass_at_{k}" for k in (1, 2, 4)} <= set(metrics)
    assert {"eval/aime2024/acc_ci_low", "eval/aime2024/acc_ci_high", "eval/acc"} <= set(metrics)
    assert not [k for k in eval_metrics(without) if "aime2024" in k]


OFFLINE_PROBE = """
import json
from lens.data import DataUnavailableError, load_problems_for
from lens.params import load_params

errors = {}
for name in ("aime2024", "amc2023"):
    try:
        load_problems_for(load_params("tiny"), "eval", name)
    except DataUnavailableError as exc:
        errors[name] = str(exc)
print(json.dumps(errors))
"""


def test_offline_default_hub_ids_not_in_the_cache_fail_naming_the_key(tmp_path):
    errors = offline_load_errors(tmp_path, OFFLINE_PROBE)
    assert set(errors) == {"aime2024", "amc2023"}
    for name, error in errors.items():
        assert re.match(rf"data\.{name}_path: cannot load '[\w/-]+' \(ConnectionError", error), error
        assert f"set data.{name}_path=<a local .jsonl or .parquet file>" in error
        assert "HF_HUB_OFFLINE is set" in error


def test_missing_local_file_names_the_key(tmp_path):
    params = load_params("tiny", [f"data.aime2024_path={tmp_path / 'absent.parquet'}"])
    with pytest.raises(DataUnavailableError, match=r"^data\.aime2024_path: cannot load .*absent\.parquet"):
        load_problems_for(params, "eval", "aime2024")

"""User suites from JSONL: every bad line reported with its number, nothing half-imported; on
SQLite and Postgres, and through ``moerge suite add``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from registry.errors import NotFoundError, RegistrationError
from registry.models import SuiteExample
from registry.service import Registry
from services.leaderboard.suites import (
    Query,
    SuiteImportError,
    import_suite,
    is_correct,
    load_queries,
    parse_rows,
)

pytest_plugins = ["tests.conftest_db"]

GOOD = [
    {"prompt": "Reverse the string\nabc\nAnswer: ", "reference": "cba", "task": "reverse", "split": "test"},
    {
        "prompt": "Count the letters\nabcd\nAnswer: ",
        "reference": "4",
        "task": "count",
        "split": "test",
        "metric": "contains",
    },
    {
        "prompt": "Which digit is biggest?\n193\nAnswer: ",
        "reference": "9",
        "choices": ["1", "9", "3"],
        "task": "max",
        "split": "hard",
        "metric": "multiple_choice",
    },
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_a_good_file_imports_every_row_in_order(registry: Registry, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD[0], "", GOOD[1], GOOD[2]])  # a blank line is skipped
    suite = import_suite(registry, "mine", path, description="three rows")
    assert suite.n_examples == 3
    rows = registry.get_suite_examples("mine")
    assert [r.line for r in rows] == [1, 3, 4]  # the file's own line numbers
    assert [r.metric for r in rows] == ["exact_match", "contains", "multiple_choice"]
    assert rows[2].choices == ["1", "9", "3"] and rows[0].choices is None
    queries = load_queries(registry, "mine")
    assert list(queries) == ["test", "hard"]
    assert queries["hard"][0] == Query(GOOD[2]["prompt"], "9", "max", "hard", "multiple_choice", ("1", "9", "3"))
    assert [s.name for s in registry.list_suites()] == ["mine"]


def test_every_bad_line_is_reported_and_nothing_is_imported(registry: Registry, tmp_path: Path) -> None:
    lines = [
        GOOD[0],  # 1 fine
        '{"prompt": "x", "reference": ',  # 2 broken JSON
        {"prompt": "p", "split": "test"},  # 3 no reference
        {**GOOD[0], "metric": "fuzzy"},  # 4 unknown metric
        {**GOOD[2], "reference": "7"},  # 5 reference not a choice
        GOOD[1],  # 6 fine
        {**GOOD[0], "refrence": "typo"},  # 7 unknown field
        {**GOOD[0]},  # 8 duplicate of line 1
        ["not", "an", "object"],  # 9 not an object
        {**GOOD[0], "prompt": "other", "split": "all"},  # 10 reserved split
        {"prompt": "q", "reference": "", "split": "test", "metric": "contains"},  # 11 empty contains
        {**GOOD[0], "prompt": "y", "choices": ["a", "b"]},  # 12 choices without MC
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SuiteImportError) as info:
        import_suite(registry, "broken", path)
    bad = dict(info.value.errors)
    assert sorted(bad) == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    assert "not valid JSON" in bad[2]
    assert "missing 'reference'" in bad[3]
    assert "metric 'fuzzy'" in bad[4]
    assert "reference '7' is not one of the choices" in bad[5]
    assert "'refrence'" in bad[7]
    assert "duplicate of line 1" in bad[8]
    assert "JSON object" in bad[9]
    assert "reserved" in bad[10]
    assert "non-empty 'reference'" in bad[11]
    assert "only for metric multiple_choice" in bad[12]
    assert "line 2:" in str(info.value) and "nothing was imported" in str(info.value)
    # the good lines 1 and 6 were not imported either
    with pytest.raises(NotFoundError):
        registry.get_suite("broken")
    assert registry.list_suites() == []


def test_a_failing_store_leaves_no_half_suite(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are inserted in one transaction: a database error on a late row keeps none."""
    rows = parse_rows(write_jsonl(tmp_path / "s.jsonl", GOOD))
    rows[2]["line"] = None  # the last row breaks a NOT NULL constraint, after two good ones
    with pytest.raises(IntegrityError):
        registry.add_suite("half", rows)
    assert registry.list_suites() == []
    with registry.session() as s:
        assert s.scalar(select(func.count()).select_from(SuiteExample)) == 0


def test_names_and_replacement(registry: Registry, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", GOOD[:2])
    import_suite(registry, "mine", path)
    with pytest.raises(RegistrationError, match="already exists"):
        import_suite(registry, "mine", path)
    import_suite(registry, "mine", write_jsonl(tmp_path / "t.jsonl", GOOD), replace=True)
    assert registry.get_suite("mine").n_examples == 3
    assert len(registry.get_suite_examples("mine")) == 3  # the old rows went with the old suite
    with pytest.raises(Exception, match="built in"):
        import_suite(registry, "skills", path)
    with pytest.raises(RegistrationError, match="invalid suite name"):
        import_suite(registry, "bad/name", path)
    registry.remove_suite("mine")
    assert registry.list_suites() == []


def test_empty_and_missing_files(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(SuiteImportError, match="no rows"):
        import_suite(registry, "e", write_jsonl(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(NotFoundError, match="does not exist"):
        import_suite(registry, "m", tmp_path / "missing.jsonl")


def test_sampling_per_task_is_seeded(registry: Registry, tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "reference": "r", "task": f"t{i % 2}", "split": "test"} for i in range(20)]
    import_suite(registry, "many", write_jsonl(tmp_path / "m.jsonl", rows))
    a = load_queries(registry, "many", n_per_task=3, seed=0)["test"]
    assert len(a) == 6 and {q.task for q in a} == {"t0", "t1"}
    assert load_queries(registry, "many", n_per_task=3, seed=0)["test"] == a
    assert load_queries(registry, "many", n_per_task=3, seed=1)["test"] != a
    assert [q.prompt for q in a] == sorted((q.prompt for q in a), key=lambda p: int(p[1:]))  # file order kept
    with pytest.raises(NotFoundError, match="no split 'nope'"):
        load_queries(registry, "many", ["nope"])


def test_metrics() -> None:
    q = Query("p", "Paris", "", "test")
    assert is_correct(q, " Paris\n") and not is_correct(q, "paris")
    c = Query("p", "Paris", "", "test", "contains")
    assert is_correct(c, "It is paris, of course") and not is_correct(c, "Lyon")


def test_cli_reports_line_numbers_and_imports_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "MOERGE_HOME": str(tmp_path / "home")}
    env.pop("MOERGE_DATABASE_URL", None)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], '{"prompt": ', {**GOOD[1], "metric": "nope"}])
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "suite", "add", "mine", str(bad)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 1
    assert "line 2: not valid JSON" in out.stderr and "line 3: metric 'nope'" in out.stderr
    assert "Traceback" not in out.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "services.cli", "suite", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert [s["name"] for s in json.loads(listed.stdout)] == ["skills"]

    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "suite", "add", "mine", str(good)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "3 examples" in out.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "services.cli", "suite", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    mine = {s["name"]: s for s in json.loads(listed.stdout)}["mine"]
    assert mine["examples"] == 3 and mine["splits"] == ["test", "hard"]


TEXTS = [
    {"segments": [["prose", "An intro. "], ["python", "def f():\n    return 1\n"]], "split": "mixed", "metric": "loss"},
    {"prompt": "SELECT 1;", "task": "sql", "split": "test", "metric": "loss"},
    {"prompt": "plain text", "split": "test", "metric": "loss"},
]


def test_text_rows_keep_their_segments_and_need_no_reference(registry: Registry, tmp_path: Path) -> None:
    import_suite(registry, "texts", write_jsonl(tmp_path / "t.jsonl", TEXTS))
    queries = load_queries(registry, "texts")
    [mixed] = queries["mixed"]
    assert mixed.metric == "loss" and mixed.reference == ""
    assert mixed.segments == (("prose", "An intro. "), ("python", "def f():\n    return 1\n"))
    assert mixed.prompt == "An intro. def f():\n    return 1\n" and mixed.task == "prose"  # the first label
    sql, plain = queries["test"]
    assert sql.segments == (("sql", "SELECT 1;"),) and sql.task == "sql"
    assert plain.segments == (("text", "plain text"),) and plain.task == "text"


def test_bad_text_rows_are_reported_and_nothing_is_imported(registry: Registry, tmp_path: Path) -> None:
    lines = [
        TEXTS[0],  # 1 fine
        {"split": "test", "metric": "loss"},  # 2 no text
        {**TEXTS[1], "segments": [["a", "b"]]},  # 3 both prompt and segments
        {"segments": [["a"]], "split": "test", "metric": "loss"},  # 4 not pairs
        {"segments": [["", "text"]], "split": "test", "metric": "loss"},  # 5 empty label
        {"segments": [["a", ""]], "split": "test", "metric": "loss"},  # 6 empty text
        {**GOOD[0], "segments": [["a", "b"]]},  # 7 segments on a question
        {"segments": [], "split": "test", "metric": "loss"},  # 8 no segments
    ]
    with pytest.raises(SuiteImportError) as info:
        import_suite(registry, "broken", write_jsonl(tmp_path / "bad.jsonl", lines))
    bad = dict(info.value.errors)
    assert sorted(bad) == [2, 3, 4, 5, 6, 7, 8]
    assert "'prompt' or 'segments'" in bad[2] and "not both" in bad[3]
    assert "[label, text]" in bad[4] and "[label, text]" in bad[8]
    assert "label of 1-128" in bad[5] and "text is empty" in bad[6]
    assert "only for metric loss" in bad[7]
    assert registry.list_suites() == []

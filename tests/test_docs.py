"""The documentation points only at what the repository holds: links, file paths and test names."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "k8s" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A path in the text that starts with one of these names is a file of the repository.
TOP_LEVEL = sorted(p.name for p in REPO.iterdir() if not p.name.startswith(".") or p.name == ".ci")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./-])((?:%s)(?:/[\w.*-]+)*/?)(?:::(\w+))?" % "|".join(
    re.escape(name) for name in TOP_LEVEL))
FILE_NAME = re.compile(r"\.(py|sh|md|ya?ml|png|txt|json|ini|cfg|toml)$|^(Dockerfile[.\w]*|setup\.py)$")


def repository_paths(text):
    """(path, test name or None) for each path into the repository that `text` names: in
    backticks or a link, or with a file name's extension (prose like "trainer/reference"
    is not a path); trailing dots (an ellipsis, a full stop) are not part of it."""
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        before = text[max(0, match.start() - 2):match.start()]
        quoted = before.endswith("`") or before == "]("
        if path and path.rstrip("/") and (quoted or FILE_NAME.search(path.split("/")[-1])):
            yield path, match.group(2)


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return [REPO / n for n in names if not n.endswith((".png", ".jpg", ".npz"))]


def test_paths_are_found_where_they_are_looked_for():
    text = "See `trainer/models.py`, [the recipe](docs/reference.md), scripts/submit.sh and " \
           "`tests/test_train.py::test_run_writes` but not runs/x or `export/`."
    found = list(repository_paths(text + " Ratios trainer/reference; `k8s/overlays/...`"))
    assert found == [("trainer/models.py", None), ("docs/reference.md", None),
                     ("scripts/submit.sh", None), ("tests/test_train.py", "test_run_writes"),
                     ("k8s/overlays/", None)]
    assert [m.group(1) for m in LINK.finditer(text)] == ["docs/reference.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_repository_path_exists(doc):
    text = doc.read_text()
    missing = []
    for match in LINK.finditer(text):
        target = match.group(1).split("#")[0]
        if target and "://" not in target and not target.startswith("mailto:"):
            if not (doc.parent / target).exists():
                missing.append(f"link {target}")
    for path, test_name in repository_paths(text):
        if "*" in path:
            if not list(REPO.glob(path)):
                missing.append(path)
        elif not (REPO / path).exists():
            missing.append(path)
        elif test_name and not re.search(rf"def {test_name}", (REPO / path).read_text()):
            missing.append(f"{path}::{test_name}")
    assert not missing, f"{doc.name} refers to what the repository does not hold: {missing}"


def test_test_names_in_the_survival_table_exist():
    """docs/reliability.md names the test behind each row of "What survives what", sometimes
    shortened (`test_sigkill_anywhere...`): each must start a test function's name."""
    table = (REPO / "docs" / "reliability.md").read_text()
    names = re.findall(r"(test_\w+)(?:\.\.\.|`|\))", table)
    assert names, "the table names no tests"
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    missing = [n for n in names if not re.search(rf"def {n}", sources) and not n.endswith(".py")
               and not (REPO / "tests" / f"{n}.py").exists()]
    assert not missing, f"the survival table names tests that do not exist: {missing}"


def test_nothing_cites_files_outside_the_repository():
    outside = re.compile(r"DESIGN\.md|\.\./shared")
    hits = [f"{p.relative_to(REPO)}:{n}" for p in tracked_text_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if outside.search(line) and p.name != "test_docs.py"]
    assert not hits, f"references to files the repository does not hold: {hits}"


def test_the_flags_page_lists_every_flag_as_the_definitions_say():
    """docs/flags.md is generated from the flag definitions: a flag added, removed or
    reworded without `python scripts/write_flags_page.py` fails here."""
    import importlib.util

    from trainer import main

    spec = importlib.util.spec_from_file_location("write_flags_page",
                                                  REPO / "scripts" / "write_flags_page.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    text = (REPO / "docs" / "flags.md").read_text()
    assert text == page.page(), "docs/flags.md is out of date: run scripts/write_flags_page.py"
    for name in main.CONFIG_FLAGS + ("print_config",):
        assert f"`--{name}`" in text, name


def fenced_blocks(text, language=""):
    """The contents of the ``` blocks of `text` opened with `language` (`` for plain ones)."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


@pytest.mark.slow
def test_the_quick_start_and_the_python_snippet_after_it_run_as_written(tmp_path):
    """README's quick start trains runs/smoke; its Python snippet then classifies an image
    with that export. Both run from a fresh directory exactly as the README writes them
    (the install part of the quick start is what .ci/run has done already)."""
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [command] = [line for block in fenced_blocks(quick_start) for line in block.splitlines()
                 if "trainer.main" in line]
    train = command.split("&&")[-1].split()
    assert train[:3] == ["python", "-m", "trainer.main"], command
    done = subprocess.run([sys.executable, *train[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [snippet] = fenced_blocks(readme, "python")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    labels = (tmp_path / "runs" / "smoke" / "export" / "labels.txt").read_text().split()
    label, probability = done.stdout.split()
    assert label in labels and 0.0 < float(probability) <= 1.0

"""The documentation stays true to the repository.

* Every "spec §N" cited in the code, the configs and the docs is a section of ``docs/algorithm.md``, and every
  section cited from the Lightning notes is one of ``docs/lightning.md``.
* No tracked text file names a path of the machine it was written on.
* The user-facing docs speak of the project, not of the sessions that built it.
* Every project object named in backquotes in the docs imports, and every repository path named in backquotes exists.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@cache
def _tracked() -> tuple[str, ...]:
    """The repository's tracked files (relative paths); falls back to a walk when git is unavailable."""
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout
        files = [line for line in out.splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)
        ]
    return tuple(sorted(f for f in files if (ROOT / f).is_file()))


def _text_files(*suffixes: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return [f for f in _tracked() if f.endswith(suffixes) and not f.startswith(exclude)]


def _user_docs() -> list[str]:
    """README.md, CONTRIBUTING.md and docs/*.md: the documents whose backquoted names and paths are checked."""
    return [f for f in _tracked() if f in ("README.md", "CONTRIBUTING.md") or re.fullmatch(r"docs/[^/]+\.md", f)]


# --------------------------------------------------------------------------------------------------------------------
# (a) section references

# A citation: one section number, or several joined by commas, dashes or "and" ("§6.5, §9", "§3.1–§3.2").
_SECTION = r"§\d+(?:\.\d+)?"
_CITATION = re.compile(rf"{_SECTION}(?:\s*(?:,|–|-|and)\s*{_SECTION})*")
# Text just before a citation that makes it a citation of the Lightning notes instead of the algorithm.
_LIGHTNING_OWNER = re.compile(r"lightning(?:-notes|\.md)\S*\s*$")


def _headings(path: Path, pattern: str) -> set[str]:
    numbers = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(pattern, line)
        if match:
            numbers.add(match.group(1))
    return numbers


def _citations() -> list[tuple[str, int, str, bool]]:
    """``(file, line, section, cites_lightning_notes)`` for every § citation in the tracked text files."""
    found = []
    for name in _text_files(".py", ".md", ".yaml", ".yml", ".toml", ".cff"):
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            for match in _CITATION.finditer(line):
                lightning = bool(_LIGHTNING_OWNER.search(line[: match.start()]))
                for section in re.findall(r"§(\d+(?:\.\d+)?)", match.group()):
                    found.append((name, number, section, lightning))
    return found


def test_algorithm_doc_has_the_sections_the_repository_cites() -> None:
    sections = _headings(ROOT / "docs" / "algorithm.md", r"#{2,3} (\d+(?:\.\d+)?)[.\s]")
    assert {"0", "1.2", "3.4", "5.7", "7.1", "11"} <= sections, "docs/algorithm.md lost its section numbering"
    citations = [c for c in _citations() if not c[3]]
    assert len(citations) > 50, "the citation scan found too few 'spec §N' references: is the pattern broken?"
    missing = [f"{name}:{line}: §{section}" for name, line, section, _ in citations if section not in sections]
    assert not missing, "cited sections that docs/algorithm.md does not have:\n" + "\n".join(missing)


def test_lightning_notes_citations_name_docs_lightning_md() -> None:
    sections = _headings(ROOT / "docs" / "lightning.md", r"## (\d+)\.\s")
    assert len(sections) >= 7
    old_name = "lightning" + "-notes"  # the notes' name before they joined the repository (in pieces: not this file)
    wrong = []
    for name in _text_files(".py", ".md", ".yaml", ".yml", ".toml"):
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            if old_name in line:
                wrong.append(f"{name}:{number}: cites '{old_name}', a file not in the repository: docs/lightning.md")
    for name, line, section, lightning in _citations():
        if lightning and section not in sections:
            wrong.append(f"{name}:{line}: docs/lightning.md has no §{section}")
    assert not wrong, "\n".join(wrong)


def test_the_scan_recognises_citations() -> None:
    line = "see spec §6.5, §9 and §3.1–§3.2; Lightning: `docs/lightning.md` §1, §4"
    groups = [(m.group(), bool(_LIGHTNING_OWNER.search(line[: m.start()]))) for m in _CITATION.finditer(line)]
    assert groups == [("§6.5, §9 and §3.1–§3.2", False), ("§1, §4", True)]


# --------------------------------------------------------------------------------------------------------------------
# (b) machine paths

# Spelled in pieces so that this file does not match itself.
_MACHINE_PATHS = re.compile(
    "|".join(re.escape(p) for p in ("/" + "work/", "/" + "root/", "/" + "home/", ".." + "/shared"))
)


def test_no_machine_paths_in_tracked_text_files() -> None:
    hits = []
    for name in _text_files(".py", ".md", ".yaml", ".yml", ".toml", ".cff", exclude=("tests/fixtures/",)):
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            if _MACHINE_PATHS.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "absolute paths of a machine (use repository-relative paths):\n" + "\n".join(hits)


# --------------------------------------------------------------------------------------------------------------------
# (c) the docs speak of the project


def test_docs_do_not_speak_of_sessions() -> None:
    names = ["README.md", "benchmarks/RESULTS.md", *[f for f in _tracked() if re.fullmatch(r"docs/[^/]+\.md", f)]]
    hits = []
    for name in names:
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bsessions?\b", line, re.IGNORECASE):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "speak of the project or the machine, not of sessions:\n" + "\n".join(hits)


# --------------------------------------------------------------------------------------------------------------------
# (d) names and paths in backquotes

_PACKAGES = ("zoa_lightning", "callbacks", "datamodules", "cli")
_FILE_SUFFIX = re.compile(r"\.(py|md|ya?ml|toml|cff|json|csv|png|pt|ckpt|txt|safetensors)$")
_DOTTED = re.compile(rf"(?:{'|'.join(_PACKAGES)})(?:\.[A-Za-z_]\w*)+")
_CLASS_MEMBER = re.compile(r"([A-Z][A-Za-z0-9]+)\.([A-Za-z_]\w*)")
_PATH = re.compile(r"[\w.<>*-]+(?:/[\w.<>*-]+)*/?")
# Files the docs name on purpose although they do not exist: CONTRIBUTING.md's worked example of a new method.
_EXAMPLE_FILES = {
    "zoa_lightning/core/methods/flip_average.py",
    "zoa_lightning/methods/flip_average.py",
    "configs/methods/flip_average.yaml",
}


def _spans(name: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every inline code span outside fenced code blocks."""
    spans = []
    fenced = False
    for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            spans.extend((number, m.group(1).strip()) for m in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", line))
    return spans


def _has_member(owner: Any, attr: str) -> bool:
    """Whether ``owner`` has ``attr``, counting instance attributes a class assigns (``self.attr = ...``)."""
    if hasattr(owner, attr):
        return True
    if inspect.isclass(owner):
        for klass in owner.__mro__:
            if attr in getattr(klass, "__annotations__", {}):
                return True
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            if re.search(rf"self\.{re.escape(attr)}\s*(?::[^=]+)?=(?!=)", source):
                return True
    return False


def _resolve(dotted: str) -> str | None:
    """``None`` if ``dotted`` names a module or an attribute of one, else why not."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not module_name.startswith(error.name):
                return f"importing {module_name} fails: {error}"
            continue
        for i, attr in enumerate(parts[cut:]):
            if not _has_member(obj, attr):
                return f"{'.'.join(parts[: cut + i])} has no {attr!r}"
            obj = getattr(obj, attr, None)
        return None
    return f"no module {parts[0]!r}"


@cache
def _project_classes() -> dict[str, str]:
    """Class name -> module, for the classes defined in the project's packages (the first definition wins)."""
    classes: dict[str, str] = {}
    for name in _text_files(".py", exclude=("tests/", "benchmarks/")):
        module = name[:-3].replace("/", ".").removesuffix(".__init__")
        for match in re.finditer(r"^class ([A-Z]\w*)\b", (ROOT / name).read_text(encoding="utf-8"), re.MULTILINE):
            classes.setdefault(match.group(1), module)
    return classes


def _check_span(text: str) -> str | None:
    """Why the span's name or path is wrong, or ``None`` (also for spans that name neither)."""
    text = text.split("::")[0]  # pytest node ids: the file part
    if _DOTTED.fullmatch(text) and not _FILE_SUFFIX.search(text):
        return _resolve(text)
    member = _CLASS_MEMBER.fullmatch(text)
    if member and member.group(1) in _project_classes():
        return _resolve(f"{_project_classes()[member.group(1)]}.{member.group(1)}.{member.group(2)}")
    if not _PATH.fullmatch(text) or text in _EXAMPLE_FILES:
        return None
    top = text.split("/")[0]
    if "/" not in text and not (text in _top_level() and _FILE_SUFFIX.search(text)):
        return None  # a bare file name: not necessarily at the repository root
    if top not in _top_level() or any(c in top for c in "<>*"):
        return None  # not a repository path (run folders, placeholders)
    if any(c in text for c in "<>*"):
        pattern = re.sub(r"<[^>]*>", "*", text)
        return None if any(ROOT.glob(pattern.rstrip("/"))) else f"nothing matches {pattern}"
    return None if (ROOT / text).exists() else "no such file or folder"


@cache
def _top_level() -> frozenset[str]:
    return frozenset(f.split("/")[0] for f in _tracked())


def test_span_checks_tell_names_and_paths_from_prose() -> None:
    assert _check_span("zoa_lightning.core.protocols.BankAdapter") is None
    assert _check_span("zoa_lightning.core.protocols.NoSuchThing") is not None
    assert _check_span("zoa_lightning.core.nosuchmodule") is not None
    assert _check_span("ZOAConfig.resolved") is None
    assert _check_span("ZOAConfig.no_such_field") is not None
    assert _check_span("KnowledgeBank.theta") is None  # a buffer assigned in __init__
    assert _check_span("configs/demo.yaml") is None
    assert _check_span("configs/nosuch.yaml") is not None
    assert _check_span("configs/methods/<method>.yaml") is None
    assert _check_span("configs/methods/<method>.json") is not None
    assert _check_span("cli.py") is None
    for prose in (
        "runs/demo/zoa/results.json",
        "~/.cache/zoa_lightning",
        "<root>/<corruption>",
        "results.csv",
        "Path.replace",
        "zoa test -c configs/demo.yaml",
        'trainer.strategy.reduce(..., "sum")',
        "lr",
    ):
        assert _check_span(prose) is None, prose


def test_backquoted_project_names_and_paths_exist() -> None:
    wrong = []
    for name in _user_docs():
        for number, text in _spans(name):
            problem = _check_span(text)
            if problem is not None:
                wrong.append(f"{name}:{number}: `{text}`: {problem}")
    assert not wrong, "names or paths in the docs that do not exist:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "name", ["docs/algorithm.md", "docs/lightning.md", "docs/conventions.md", "LICENSE", "CITATION.cff"]
)
def test_documents_the_repository_relies_on_exist(name: str) -> None:
    assert name in _tracked() or (ROOT / name).is_file()

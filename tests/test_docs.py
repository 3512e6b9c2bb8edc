"""The documentation stays true to the repository: README size and commands, pages linked, links resolve, quoted code
equals the code the tests run, no tracker bookkeeping, and every ``python -m`` names a module that exists.

Code quoted in a page is preceded by a marker line naming a region of a file::

    <!-- snippet: examples/my_models.py:register -->
    ```python
    ...exactly the lines between "# [docs:register]" and "# [/docs:register]" in that file, dedented...
    ```

``<!-- snippet: PATH -->`` without a region quotes the whole file. Line-number ranges are not supported: they rot.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = ["architecture.md", "running.md", "operations.md", "policies.md", "communication.md", "models.md",
         "benchmarks.md", "testing.md"]
README_LIMIT = 12_000

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SNIPPET = re.compile(r"^<!-- snippet: (?P<path>[^\s:#]+)(?::(?P<region>[\w-]+))? -->\n"
                     r"```(?P<lang>\w*)\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
MARKER_LINE = re.compile(r"^<!--\s*snippet\b.*$", re.M)
PYTHON_FENCE = re.compile(r"^```(?:python|py)[ \t]*$", re.M)
TRACKER = re.compile(r"\b(?:issues?|tickets?|PRs?|pull requests?)\s*#?\s*\d+\b|(?<![\w&/#])#\d+\b", re.I)
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*(?:\|[A-Za-z_][\w.]*)*)")
CONSOLE_SCRIPT = re.compile(r"(?<![\w-])(splitexit-[a-z][a-z-]*[a-z])\b")


def prose(text: str) -> str:
    """The text with fenced code blocks and inline code removed (links and anchors live outside them)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def region(path: Path, name: str | None) -> str:
    text = path.read_text(encoding="utf-8")
    if name is None:
        return text.rstrip("\n")
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"# [docs:{name}]"]
    ends = [i for i, line in enumerate(lines) if line.strip() == f"# [/docs:{name}]"]
    if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0]:
        raise AssertionError(f"{rel(path)}: region {name!r} needs exactly one '# [docs:{name}]' line followed by "
                             f"one '# [/docs:{name}]' line (found {len(starts)} and {len(ends)})")
    return textwrap.dedent("\n".join(lines[starts[0] + 1:ends[0]])).strip("\n")


def test_readme_is_short_and_has_the_two_commands():
    data = README.read_bytes()
    assert len(data) <= README_LIMIT, f"README.md is {len(data):,} bytes; the limit is {README_LIMIT:,}"
    text = data.decode("utf-8")
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("page", PAGES)
def test_every_page_exists_and_is_linked_from_readme(page):
    assert (DOCS / page).is_file(), f"docs/{page} is missing"
    targets = {m.group(1).split("#")[0] for m in LINK.finditer(prose(README.read_text(encoding="utf-8")))}
    assert f"docs/{page}" in targets, f"README.md does not link docs/{page}"


@pytest.mark.parametrize("doc", documents(), ids=rel)
def test_relative_links_resolve(doc):
    broken = []
    for m in LINK.finditer(prose(doc.read_text(encoding="utf-8"))):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{rel(doc)}: broken links: {broken}"


@pytest.mark.parametrize("doc", documents(), ids=rel)
def test_snippets_equal_the_code_they_quote(doc):
    text = doc.read_text(encoding="utf-8")
    problems = []
    snippets = list(SNIPPET.finditer(text))
    markers = MARKER_LINE.findall(text)
    if len(markers) != len(snippets):
        parsed = {text[m.start():].splitlines()[0] for m in snippets}
        problems += [f"malformed marker or no fenced block right after it: {line}" for line in markers
                     if line not in parsed]
    quoted = {m.start("body") for m in snippets}
    for fence in PYTHON_FENCE.finditer(text):
        if fence.end() + 1 not in quoted:
            line = text.count("\n", 0, fence.start()) + 1
            problems.append(f"line {line}: python block without a snippet marker (quote a file the tests run)")
    for m in snippets:
        source = ROOT / m.group("path")
        if not source.is_file():
            problems.append(f"{m.group('path')}: no such file")
            continue
        try:
            expected = region(source, m.group("region"))
        except AssertionError as e:
            problems.append(str(e))
            continue
        if m.group("body").strip("\n") != expected:
            problems.append(f"block quoting {m.group('path')}:{m.group('region')} differs from the file's region")
    assert not problems, f"{rel(doc)}: " + "; ".join(problems)


def test_snippet_checker_catches_drift(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("x = 0\n# [docs:a]\n    y = 1\n# [/docs:a]\n")
    assert region(source, "a") == "y = 1"
    assert region(source, None).startswith("x = 0")
    with pytest.raises(AssertionError, match="region 'b'"):
        region(source, "b")
    page = "<!-- snippet: examples/my_models.py:register -->\n```python\nchanged\n```\n"
    m = SNIPPET.search(page)
    assert m and m.group("region") == "register" and m.group("body").strip("\n") == "changed"


@pytest.mark.parametrize("doc", documents(), ids=rel)
def test_no_tracker_bookkeeping(doc):
    hits = [m.group(0) for m in TRACKER.finditer(doc.read_text(encoding="utf-8"))]
    assert not hits, f"{rel(doc)} refers to tracker items: {hits} (say what the target is, not where it was filed)"


def mentioned_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for doc in documents():
        for m in PYTHON_M.finditer(doc.read_text(encoding="utf-8")):
            for name in m.group(1).rstrip(".").split("|"):
                found.setdefault(name, set()).add(rel(doc))
    return found


def runnable(name: str) -> bool:
    """``python -m name`` would run: a module, or a package with a ``__main__``; one of this repository's own
    packages must resolve to a file in this checkout (an editable install elsewhere must not answer for it)."""
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{name}.__main__")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    top = name.split(".")[0]
    if (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file():
        return spec.origin is not None and Path(spec.origin).resolve().is_relative_to(ROOT)
    return True


def test_every_python_dash_m_names_a_module():
    modules = mentioned_modules()
    assert {"device", "scripts.launch_local", "training.train"} <= set(modules)
    missing = {name: sorted(where) for name, where in modules.items() if not runnable(name)}
    assert not missing, f"`python -m` of modules that do not exist: {missing}"


def test_every_console_script_is_declared():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
                   .get("project", {}).get("scripts", {}))
    named = {m.group(1) for doc in documents() for m in CONSOLE_SCRIPT.finditer(doc.read_text(encoding="utf-8"))}
    assert not named - declared, f"console scripts named in the docs but not in pyproject.toml: {named - declared}"

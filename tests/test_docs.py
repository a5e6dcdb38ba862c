"""Docs that stay true: every link and anchor of the Markdown pages resolves, every
`research.x.y` name and every `docs/...` path that code or docs mention exists, and every flag
that a message of the code suggests is a flag of an app.

Tables generated from records (the explanation methods' in docs/explain.md) are checked
against their records at the end of this module.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import sys

import pytest

import warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "BUILD.md", "tests/README.md"] +
               [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))])
CODE = sorted(os.path.relpath(p, ROOT)
              for p in glob.glob(os.path.join(ROOT, "research", "**", "*.py"), recursive=True))
OTHER = ["Makefile", "setup.cfg", ".ci/run"]


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def prose(text: str) -> str:
    """A Markdown page without its fenced code blocks (their '#' lines are not headings)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: the rendered text (links as their text, no code or emphasis
    marks), lower case, punctuation other than '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(rel: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(read(rel)).split("\n"):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = github_anchor(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*?\]\(([^)\s]+)\)")


def test_docs_github_anchor_rule():
    assert github_anchor("A full run (AVX512-BF16): `make run`, `cpu` profile, 2-core AMD "
                         "EPYC, mixed_bfloat16") == \
        "a-full-run-avx512-bf16-make-run-cpu-profile-2-core-amd-epyc-mixed_bfloat16"
    assert github_anchor("The explain app: `research.apps.explain`") == \
        "the-explain-app-researchappsexplain"
    assert github_anchor("[BUILD.md](BUILD.md), tests") == "buildmd-tests"


def test_docs_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(read(page))):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path \
                else os.path.join(ROOT, page)
            if not os.path.exists(full):
                broken.append(f"{page}: {target}: no such file")
            elif anchor and full.endswith(".md") and \
                    anchor not in anchors(os.path.relpath(full, ROOT)):
                broken.append(f"{page}: {target}: no such heading")
    assert not broken, "\n".join(broken)


def module_file(parts: list[str]) -> str | None:
    base = os.path.join(ROOT, *parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def top_level_names(path: str) -> dict[str, ast.AST]:
    """Names a module defines or imports at its top level (classes keep their node)."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def class_attributes(node: ast.ClassDef) -> set[str]:
    out = set()
    for n in node.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out.add(n.target.id)
        elif isinstance(n, ast.Assign):
            out |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    return out


def dotted_name_problem(name: str) -> str | None:
    """None if `research.a.b...` is a module, or a module's top-level name, or an attribute
    of a class defined there; else what is missing."""
    parts = name.split(".")
    k = len(parts)
    while k > 0 and module_file(parts[:k]) is None:
        k -= 1
    if k == 0:
        return "no such module"
    rest = parts[k:]
    if not rest:
        return None
    names = top_level_names(module_file(parts[:k]))
    if rest[0] not in names:
        return f"{'.'.join(parts[:k])} has no {rest[0]}"
    node = names[rest[0]]
    if len(rest) > 1 and isinstance(node, ast.ClassDef) and \
            rest[1] not in class_attributes(node):
        return f"{'.'.join(parts[:k + 1])} has no {rest[1]}"
    return None


DOTTED = re.compile(r"(?<![\w./-])research(?:\.[A-Za-z_]\w*)+")


def test_docs_dotted_name_check_can_fail():
    assert dotted_name_problem("research.training.recipes.load_recipe") is None
    assert dotted_name_problem("research.training.config.TrainConfig.validate") is None
    assert dotted_name_problem("research.training.metrics") == "no such module" or \
        dotted_name_problem("research.training.metrics").startswith("research.training has no")
    assert dotted_name_problem("research.training.steps.l2_coefficients") == \
        "research.training.steps has no l2_coefficients"
    assert dotted_name_problem("research.training.config.TrainConfig.from_json") == \
        "research.training.config.TrainConfig has no from_json"


def test_docs_every_research_name_mentioned_exists():
    missing = []
    for rel in CODE + PAGES + OTHER:
        for name in sorted(set(DOTTED.findall(read(rel)))):
            name = name.rstrip(".")
            problem = dotted_name_problem(name)
            if problem:
                missing.append(f"{rel}: {name}: {problem}")
    assert not missing, "\n".join(missing)


DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./*-]*[\w*]")


def test_docs_every_docs_path_mentioned_exists():
    missing = []
    for rel in CODE + PAGES + OTHER:
        for path in sorted(set(DOCS_PATH.findall(read(rel)))):
            # a glob, or an output prefix (compare --output=docs/x writes x.md, x.json, x.png)
            full = os.path.join(ROOT, path)
            found = glob.glob(full) if "*" in path else \
                os.path.exists(full) or glob.glob(full + ".*")
            if not found:
                missing.append(f"{rel}: {path}")
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------------------------------------
# Flags that messages suggest

# The apps, and the benchmarks that are absl apps: the flags each defines, read from absl
# itself in one subprocess (two apps cannot share a process's FLAGS: --model means two things).
LIST_FLAGS = r"""
import importlib, json, sys
from absl import flags
import research
base = set(flags.FLAGS)
out = {}
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m.startswith(("research.apps", "research.benchmarks"))]:
        del sys.modules[m]  # the packages too, or `from research.benchmarks import peak` reuses
    for package in ("apps", "benchmarks"):
        vars(research).pop(package, None)
    importlib.import_module(name)
    out[name] = sorted(flags.FLAGS)  # absl's own (--help, --log_dir, ...) included
    for f in set(flags.FLAGS) - base:
        delattr(flags.FLAGS, f)
print(json.dumps(out))
"""


def absl_apps() -> list[str]:
    out = []
    for rel in CODE:
        if rel.startswith(("research/apps/", "research/benchmarks/")) and \
                "DEFINE_" in read(rel) or rel.startswith("research/apps/") and \
                "config_flags." in read(rel):
            if not rel.endswith(("__init__.py", "config_flags.py")):
                out.append(rel[:-3].replace("/", "."))
    return sorted(out)


@pytest.fixture(scope="module")
def app_flags() -> dict[str, set[str]]:
    res = warm.run([sys.executable, "-c", LIST_FLAGS, *absl_apps()], cwd=ROOT, timeout=600,
                   env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    return {k: set(v) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


# Flags of other programs that our messages and help name on purpose, and placeholders.
OTHER_PROGRAMS = {
    "gpus-per-task", "ntasks", "kill-on-bad-exit", "signal", "requeue", "open-mode",
    "wait",                               # srun / sbatch
    "logdir",                             # tensorboard
    "dir", "tag_set", "signature_def",    # saved_model_cli
    "no-deps", "config-settings",         # pip
    "porcelain",                          # git
    "query-gpu", "format",                # nvidia-smi
}
PLACEHOLDERS = {"flag", "name"}           # "one --flag=value per line"
# Read by absl's parser itself, or defined by app.run: in no FlagValues an import leaves.
ABSL_PARSER = {"flagfile", "undefok", "help", "helpshort", "helpfull", "helpxml",
               "only_check_args"}
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*(?:-[a-z0-9]+)*)")
# `python -m research.apps.X --a --b`: the flags up to the end of the line (or of the code
# span, sentence or parenthesis) are X's.
COMMAND = re.compile(r"research\.((?:apps|benchmarks)\.\w+)([^\n`;)]*?)(?=[\n`;)]|\. |$)")


def strings(path: str):
    """(line, text) of every string literal of a module, f-strings' constant parts joined."""
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                       for v in node.values)


def flag_known(name: str, flag_set: set[str]) -> bool:
    return name in flag_set or (name.startswith("no") and name[2:] in flag_set)


def flag_problems(text: str, app_flags: dict[str, set[str]]) -> list[str]:
    """What is wrong with the flags `text` suggests: a flag in a command of one app must be
    that app's; any other must be some app's."""
    every = set().union(*app_flags.values()) | ABSL_PARSER
    problems = []
    rest = text
    for m in COMMAND.finditer(text):
        app = f"research.{m.group(1)}"
        if app in app_flags:
            own = m.group(2).split(" -- ")[0]  # after " -- ": the flags of the app it starts
            for flag in FLAG.findall(own):
                if flag not in OTHER_PROGRAMS and \
                        not flag_known(flag, app_flags[app] | ABSL_PARSER):
                    problems.append(f"--{flag} is not a flag of {app}")
            rest = rest.replace(own, " ")
    for flag in FLAG.findall(rest):
        if flag not in OTHER_PROGRAMS | PLACEHOLDERS and not flag_known(flag, every):
            problems.append(f"--{flag} is no app's flag")
    return problems


@pytest.mark.xdist_group("app_flags")  # the module fixture, listed once
def test_docs_every_flag_a_message_suggests_exists(app_flags):
    unknown = []
    for rel in CODE:
        for line, text in strings(rel):
            unknown += [f"{rel}:{line}: {p}" for p in flag_problems(text, app_flags)]
    assert not unknown, "\n".join(unknown)


@pytest.mark.xdist_group("app_flags")  # the module fixture, listed once
def test_docs_the_flag_lists_are_absls(app_flags):
    """The lists the flag check reads are the apps' real flags (so that check can fail)."""
    assert {"data_dir", "run_name", "learning_rate", "widths", "gpu_memory_growth"} <= \
        app_flags["research.apps.train"]
    assert "learning_rate" not in app_flags["research.apps.predict"]
    assert {"images", "images_from", "threshold"} <= app_flags["research.apps.predict"]
    assert flag_problems("run `python -m research.apps.predict --learning_rate=1`", app_flags) \
        == ["--learning_rate is not a flag of research.apps.predict"]
    assert flag_problems("use --no_such_flag", app_flags) == ["--no_such_flag is no app's flag"]
    assert flag_problems("resume with --restart, or `python -m research.apps.train "
                         "--run_name=x`", app_flags) == []


# Tables generated from records: each block between <!-- name:begin --> and <!-- name:end -->
# in a docs/ page equals the table its records render.


def generated_block(marker: str) -> str:
    """The text between <!-- marker:begin --> and <!-- marker:end --> in the docs/ page that
    holds them."""
    for page in sorted(p for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md")):
        with open(os.path.join(ROOT, "docs", page), encoding="utf-8") as f:
            text = f.read()
        if f"<!-- {marker}:begin -->" in text:
            return text.split(f"<!-- {marker}:begin -->\n")[1].split(f"<!-- {marker}:end -->")[0]
    raise AssertionError(f"no docs/ page has the {marker} markers")


def test_docs_tables_are_the_records():
    from research.explain import methods
    from research.lab import photo_steps
    from research.model_options import backbones_table

    assert generated_block("methods") == methods.markdown_table()
    assert generated_block("backbones") == backbones_table()
    assert generated_block("photo_steps") == photo_steps.markdown_table()

"""README.md is the front door: its relative links resolve, every `onestep-train` command in it parses with the
real CLI (no training runs), and the sections the documentation site includes (docs/index.md, docs/testing.md) are
marked. The site itself is built with `mkdocs build --strict` (see README's "Documentation")."""

import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def test_readme_is_short():
    assert README.count("\n") <= 220, "README.md is the front door; research tables and studies go to docs/"


def test_relative_links_resolve():
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", README) if "://" not in target]
    assert links, "README.md links the documentation pages"
    missing = [link for link in links if link and not os.path.exists(os.path.join(REPO, link))]
    assert missing == []


def test_sections_the_docs_include_are_marked():
    for name in ("install", "tests"):
        assert f"--8<-- [start:{name}]" in README and f"--8<-- [end:{name}]" in README
    docs = open(os.path.join(REPO, "docs", "index.md"), encoding="utf-8").read() + open(os.path.join(REPO, "docs", "testing.md"), encoding="utf-8").read()
    assert '--8<-- "README.md:install"' in docs and '--8<-- "README.md:tests"' in docs


def commands() -> list[str]:
    """Every `onestep-train ...` line of README's bash blocks (backslash continuations joined, comments dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("onestep-train"):
                found.append(line)
    return found


@pytest.mark.parametrize("command", commands())
def test_trainer_commands_parse(command):
    from onestep_pipelines.training import cli
    from onestep_pipelines.training.config import resolve

    args = vars(cli._parser().parse_args(shlex.split(command)[1:]))  # argparse exits on an unknown flag
    if args.pop("command") == "distill":
        args.pop("config", None)
        resolve(args)  # the options' own checks (ranges, choices, combinations)


def test_readme_has_the_trainer_commands():
    assert any(c == "onestep-train distill" for c in commands())
    t2i = [c for c in commands() if "--teacher" in c]
    assert t2i and all(flag in t2i[0] for flag in ("--prompts", "--lora-rank"))

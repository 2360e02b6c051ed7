"""What the README and the operations guide show, read as a new user copies it: every `sftflow` command in their
code blocks parses (its subcommand, options and arguments exist; its `--help` runs), every `--set` on a config
loads, and the README's sweep space file validates with each of its keys a config field."""

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from sftflow.cli.app import app
from sftflow.configs.loader import load_config
from sftflow.sweeps import space

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "deployments/README.md"]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    return [(doc, m.group(2)) for doc in DOCS for m in BLOCK.finditer((REPO / doc).read_text()) if m.group(1) == lang]


def commands() -> list[tuple[str, list[str]]]:
    """Each `sftflow ...` line of the bash blocks and each `$ sftflow ...` prompt of the recorded sessions
    (continuations joined, comments dropped) -> its arguments."""
    found = []
    sessions = [(doc, "\n".join(l[2:] for l in text.splitlines() if l.startswith("$ ") and "sftflow " in l))
                for doc, text in blocks("text")]
    for doc, text in blocks("bash") + sessions:
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w.endswith("sftflow") and (w == "sftflow" or w.endswith("/sftflow")):
                    found.append((doc, words[i + 1:words.index("&&", i) if "&&" in words[i:] else None]))
                    break
    return found


def resolve(args: list[str]) -> tuple[object, list[str], list[str]]:
    """The click command an argument list names, the arguments left for it, and its name path."""
    cmd, path, args = typer.main.get_command(app), [], list(args)
    while hasattr(cmd, "commands"):  # a group (typer vendors its own click)
        args = [a for a in args if a not in ("--debug", "--verbose", "-v")] if not path else args
        assert args and args[0] in cmd.commands, f"no command {args[:1]} under `sftflow {' '.join(path)}`"
        path.append(args[0])
        cmd = cmd.commands[args.pop(0)]
    return cmd, args, path


COMMANDS = commands()


def test_the_docs_show_the_commands_a_user_needs():
    names = {" ".join(resolve(args)[2]) for _, args in COMMANDS}
    assert {"run", "up", "deploy", "compare", "down", "sweep", "monitor", "config", "screenshots",
            "history"} <= names


@pytest.mark.parametrize("doc, args", COMMANDS, ids=[f"{d}: {' '.join(a)}" for d, a in COMMANDS])
def test_every_documented_command_parses(doc, args):
    cmd, rest, path = resolve(args)
    cmd.make_context(" ".join(path), rest)  # unknown options, missing or extra arguments raise here
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    config = next((a for a in rest if a.endswith(".yaml") and (REPO / a).is_file() and "sweep" not in a), None)
    sets = [rest[i + 1] for i, a in enumerate(rest) if a in ("--set", "-s")]
    if config:
        load_config(REPO / config, sets)
    else:
        assert not sets, "a documented --set with no config to load it on"


def test_the_readmes_space_file_validates_and_names_config_fields(tmp_path):
    [(_, text)] = blocks("yaml")
    (tmp_path / "space.yaml").write_text(text)
    spec = space.load_spec(tmp_path / "space.yaml")
    first = {}
    for key, dist in yaml.safe_load(text)["params"].items():
        first[key] = dist[0] if isinstance(dist, list) else dist.get("low", (dist.get("choices") or [None])[0])
    load_config(REPO / "configs" / "smoke.yaml", space.every_trial(spec, space.overrides(first)))

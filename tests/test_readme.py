"""The README's command reference is true: every command and option that ``atlasq --help`` and each
command's ``--help`` list is documented in the README, in that command's section, and every
``atlasq COMMAND`` and ``--option`` the README shows in code exists.

The commands are read from the CLI itself (typer's click command tree), so a command or option
added, renamed or removed without the README following fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from atlasq.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = re.compile(r"^### `atlasq ([a-z][a-z-]*(?: [a-z][a-z-]*)?)")


def _commands() -> dict:
    """Every runnable command by its path after ``atlasq`` (``"index"``, ``"atlas build"`` …).

    Duck-typed (groups have ``commands``, options have ``param_type_name == "option"``): typer
    builds on click, or on its own copy of click in recent versions."""
    out = {}

    def walk(command, path: list[str]) -> None:
        if isinstance(getattr(command, "commands", None), dict):
            for name, sub in command.commands.items():
                walk(sub, path + [name])
        elif not command.hidden:
            out[" ".join(path)] = command
    walk(typer.main.get_command(app), [])
    return out


COMMANDS = _commands()


def _options(command) -> set[str]:
    """Option spellings of a command: ``--name`` and short ``-k`` alike (not ``--help``)."""
    return {spelling for p in command.params if p.param_type_name == "option"
            for spelling in p.opts + p.secondary_opts} - {"--help"}


def _sections() -> dict[str, str]:
    """README text per command section (``### `atlasq …` `` up to the next heading)."""
    sections, current = {}, None
    for line in README.splitlines():
        match = SECTION.match(line)
        if match:
            current = match.group(1)
            sections[current] = line + "\n"
        elif line.startswith("#"):
            current = None
        elif current:
            sections[current] += line + "\n"
    return sections


def _common_text() -> str:
    """The text between ``## Commands`` and its first command section: what every command takes."""
    start = README.index("## Commands")
    return README[start:README.index("\n### ", start)]


def _code(text: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return spans + [line for block in blocks for line in block.splitlines()]


def _invocations(text: str) -> list[tuple[str, list[str]]]:
    """``(command path, the words after it)`` for each ``atlasq …`` invocation shown in code."""
    found = []
    for code in _code(text):
        for piece in re.split(r"&&|\||;", code):
            words = piece.split()
            for n, word in enumerate(words):
                if word == "atlasq" and (n == 0 or words[n - 1] not in ("from", "import")) \
                        and n + 1 < len(words) and re.fullmatch(r"[a-z][a-z-]*", words[n + 1]) \
                        and words[n + 1] != "import":
                    path = words[n + 1]
                    rest = words[n + 2:]
                    if path not in COMMANDS and rest and f"{path} {rest[0]}" in COMMANDS:
                        path, rest = f"{path} {rest[0]}", rest[1:]
                    found.append((path, rest))
    return found


def test_the_cli_has_the_commands_the_readme_is_checked_against():
    # The walk itself has teeth: it sees the commands everyone knows, groups resolved.
    assert {"index", "search", "atlas build", "atlas info", "histogram", "app", "demo"} <= set(COMMANDS)
    assert "--name" in _options(COMMANDS["index"]) and "-k" in _options(COMMANDS["search"])


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_and_option_is_documented_in_its_section(path):
    sections = _sections()
    assert path in sections, f"README has no section ### `atlasq {path} …`"
    documented = sections[path] + _common_text()
    named = lambda o: re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", documented)
    # A flag pair (--force/--no-force) is documented by either spelling.
    missing = sorted("/".join(p.opts + p.secondary_opts) for p in COMMANDS[path].params
                     if p.param_type_name == "option" and "--help" not in p.opts
                     and not any(named(o) for o in p.opts + p.secondary_opts))
    assert not missing, f"`atlasq {path}`: options not in its README section: {', '.join(missing)}"


def test_every_command_the_readme_shows_exists_with_the_options_it_shows():
    invocations = _invocations(README)
    assert len(invocations) >= 10
    wrong = []
    for path, words in invocations:
        if path not in COMMANDS:
            wrong.append(f"atlasq {path}: no such command")
            continue
        known = _options(COMMANDS[path])
        for word in words:
            option = word.split("=")[0].strip("[]`,.;:()")
            if re.fullmatch(r"--?[a-z][a-z-]*", option) and option not in known | {"--help"}:
                wrong.append(f"atlasq {path}: no option {option}")
    assert not wrong, wrong


def test_every_option_a_command_section_mentions_exists():
    # Bare `--option` spans in a command's section belong to that command, or to a command the
    # section shows being run (`atlasq atlas build --layer …` inside `atlasq index`'s section).
    wrong = []
    common = {o for p in COMMANDS.values() for o in _options(p)
              if re.search(rf"`{re.escape(o)}`", _common_text())}
    for path, text in _sections().items():
        if path not in COMMANDS:
            wrong.append(f"section for a command that does not exist: atlasq {path}")
            continue
        allowed = _options(COMMANDS[path]) | common
        for other, _ in _invocations(text):
            allowed |= _options(COMMANDS[other]) if other in COMMANDS else set()
        for code in _code(text):
            if "atlasq" in code or "streamlit" in code or "pip" in code:
                continue  # invocations are checked above; other programs' options are theirs
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", code):
                if option not in allowed:
                    wrong.append(f"atlasq {path}: {option}")
    assert not wrong, wrong


# ---------------------------------------------------------------- the README's commands run as written

#: README commands the test cannot run, each with the reason. A command added to the README that
#: cannot run against the demo home here belongs in this list, with its reason; an entry whose
#: command left the README fails the test, so the list stays the README's.
NOT_RUN = {
    "atlasq demo": "builds the 512-step demo atlas (minutes); tests/test_demo.py runs it with quick icons",
    "atlasq index ~/photos --name photos --attributions": "the reader's own photos",
    "atlasq search ~/query.png --index photos --json": "the reader's own image and index",
    "atlasq index /data/imagenet-train-subset --name imagenet-ref --attributions --relaxed-maxpool "
    "--samples-per-image 1": "needs an ImageNet subset and the ImageNet weights (network)",
    "atlasq atlas build --index imagenet-ref --name imagenet-4c --layer mixed4c --grids 20,40,80 "
    "--max-activations 1000000": "needs the index above; hours of work",
    "atlasq app": "starts a server that runs until stopped (tests/test_app.py drives the app)",
    "atlasq app --index photos --atlas imagenet-4c": "starts a server; the reader's own index and atlas",
    "atlasq index /shared/imagenet --name imagenet-ref --engine ray --ray-address auto --num-workers 64":
        "needs a Ray cluster and ImageNet (tests/test_ray_engine.py runs the engine on a local Ray)",
    "atlasq atlas export imagenet-4c imagenet-4c.atlas --compact": "needs the ImageNet atlas "
        "(tests/test_bundle.py exports and imports atlases)",
    "atlasq atlas import imagenet-4c.atlas --name imagenet --home ~/atlasq-home": "needs the exported file above",
    "atlasq atlas import imagenet-4c.atlas": "needs the exported file above",
    "atlasq index /data/imagenet-subset --name imagenet-ref --attributions --relaxed-maxpool --samples-per-image 1 "
    "--device cuda": "needs a CUDA GPU and ImageNet",
    "atlasq index /shared/imagenet-subset --name imagenet-ref --attributions --relaxed-maxpool --samples-per-image 1 "
    "--engine ray --ray-address auto --num-workers 16 --gpus-per-worker 1": "needs a Ray cluster with GPUs",
    "atlasq index ~/photos --name photos --layers mixed4c": "the reader's own photos",
    "atlasq histogram --atlas imagenet-4c --index photos": "the reader's own index on the ImageNet atlas",
}


def _readme_command_lines() -> list[str]:
    """Every ``atlasq …`` command line in the README's fenced code blocks (a line chaining
    commands with ``&&`` contributes its atlasq part), in order, without repeats."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S):
        for line in block.splitlines():
            for piece in re.split(r"&&|;", line.split(" #")[0]):
                words = piece.split()
                if words[:1] == ["atlasq"] and len(words) > 1 and " ".join(words) not in found:
                    found.append(" ".join(words))
    return found


README_COMMANDS = _readme_command_lines()
#: What human output must never show: a Python repr (None, a list, a dict or a tuple of strings).
REPR = re.compile(r"\bNone\b|\[['\"(]|\{['\"]|\('")


@pytest.fixture(scope="module")
def readme_home(atlas_home, copy_home):
    """The demo home the README's commands expect: index ``sample`` and its atlas ``sample`` (the
    session's quick atlas, under the demo's name)."""
    import json

    home = copy_home(atlas_home)
    (home / "atlases" / "app").rename(home / "atlases" / "sample")
    manifest = home / "atlases" / "sample" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": "sample"}))
    return home


def test_the_readme_shows_commands_and_the_skip_list_is_current():
    assert len(README_COMMANDS) >= 8
    gone = sorted(set(NOT_RUN) - set(README_COMMANDS))
    assert not gone, f"NOT_RUN in tests/test_readme.py lists commands the README no longer shows: {gone}"


@pytest.mark.parametrize("line", [c for c in README_COMMANDS if c not in NOT_RUN])
def test_every_readme_command_runs_as_written_on_the_demo_data(line, readme_home, monkeypatch):
    import json
    import shlex

    from typer.testing import CliRunner

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # README commands run from the checkout
    words = shlex.split(line)[1:]
    # `atlasq app` hands its process over to Streamlit: run in here, it would replace pytest itself
    assert words[0] != "app", f"`{line}` starts the app's server: add it to NOT_RUN in tests/test_readme.py"
    result = CliRunner(env={"ATLASQ_HOME": str(readme_home)}).invoke(app, words)
    assert result.exit_code == 0, (
        f"`{line}` (from the README) failed with exit code {result.exit_code}:\n{result.output}\n"
        f"Fix the README, or, if this command cannot run against the demo home in a test, add it to "
        f"NOT_RUN in tests/test_readme.py with the reason.")
    if "--json" in words:
        json.loads(result.stdout)  # nothing but the JSON on stdout
    else:
        assert result.stdout.strip() or result.stderr.strip(), f"`{line}` printed nothing"
        assert not REPR.search(result.output), f"`{line}` prints a Python repr:\n{result.output}"

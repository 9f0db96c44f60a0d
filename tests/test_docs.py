"""The commands in README.md and docs/*.md name real modules, config files, flags and fields.

Read statically (no command runs): a flag is defined where its module calls
``flags.DEFINE_*("name", ...)`` (or ``cli.define_checkpoint_flags()``), a
``--config.a.b`` override names a field of ``config_lib.FIELDS``.
"""

import glob
import os
import re

import pytest

from alexnet_jax import config_lib
from tests.conftest import ROOT

COMMAND = re.compile(r"python (?:-m (alexnet_jax(?:\.\w+)+)|(launch\.py))")
FLAG = re.compile(r"^\[?--([\w.]+)")
DEFINED = re.compile(r"DEFINE_\w+\(\s*\"(\w+)\"")
ABSL_FLAGS = {"help", "helpfull", "helpshort", "flagfile"}
README_AND_DOCS = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]


def _shell_texts(markdown: str) -> list[str]:
    """Shell lines of code blocks (continuations joined) and inline code spans of the prose."""
    texts, prose, block, language = [], [[]], None, ""
    for line in markdown.splitlines():
        fence = re.match(r"```(\w*)", line)
        if fence and block is None:  # An opening fence.
            block, language = [], fence.group(1)
        elif fence:  # The closing one.
            if language != "python":
                texts += "\n".join(block).replace("\\\n", " ").splitlines()
            block = None
            prose.append([])
        elif block is not None:
            block.append(line)
        else:
            prose[-1].append(line)
    prose = ["\n".join(lines) for lines in prose]
    for text in prose:
        indented = [line[4:] for line in text.splitlines() if line.startswith("    ")]
        texts += "\n".join(indented).replace("\\\n", " ").splitlines()
        unindented = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
        texts += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", unindented)]
    return texts


def _commands(markdown: str) -> list[tuple[str, list[str], str]]:
    """(module path, its --flags, the command) for every python command of the text."""
    found = []
    for text in _shell_texts(markdown):
        for match in COMMAND.finditer(text):
            module = match.group(1)
            path = module.replace(".", "/") + ".py" if module else "launch.py"
            rest = re.split(r"\s(?:;|\||&&|&|#)", text[match.end() :])[0]
            flags = [m.group(1) for token in rest.split() if (m := FLAG.match(token))]
            command = " ".join((text[match.start() : match.end()] + rest).split())
            found.append((path, flags, command))
    return found


def _defined_flags(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as f:
        source = f.read()
    names = set(DEFINED.findall(source)) | ABSL_FLAGS
    if "cli.define_checkpoint_flags()" in source:
        with open(os.path.join(ROOT, "alexnet_jax", "cli.py")) as f:
            names |= set(DEFINED.findall(f.read()))
    return names


def _problems(markdown: str) -> list[str]:
    """What a command of the text names that does not exist, one line each."""
    fields = {field.name for field in config_lib.FIELDS}
    problems = []
    for path, flags, command in _commands(markdown):
        if not os.path.isfile(os.path.join(ROOT, path)):
            problems.append(f"no module {path}: {command}")
            continue
        defined = _defined_flags(path)
        for flag in flags:
            if flag.startswith("config."):
                if flag.removeprefix("config.") not in fields:
                    problems.append(f"no config field {flag}: {command}")
            elif flag not in defined:
                problems.append(f"{path} defines no --{flag}: {command}")
        for config in re.findall(r"--config=(configs/\w+\.py)", command):
            if not os.path.isfile(os.path.join(ROOT, config)):
                problems.append(f"no config file {config}: {command}")
    return problems


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_the_extraction_sees_commands_of_every_kind():
    paths = {path for name in README_AND_DOCS for path, _, _ in _commands(_read(name))}
    for path in (
        "launch.py",
        "alexnet_jax/data/prepare.py",
        "alexnet_jax/evaluate.py",
        "alexnet_jax/predict.py",
        "alexnet_jax/visualize.py",
        "alexnet_jax/export.py",
        "alexnet_jax/import_weights.py",
        "alexnet_jax/benchmarks/train_step.py",
    ):
        assert path in paths, path
    block = "```bash\npython launch.py --config=configs/demo.py \\\n  --workdir=/w\n```\n"
    continued = _commands(block)
    assert continued == [("launch.py", ["config", "workdir"], continued[0][2])]
    inline = _commands("Run `python -m alexnet_jax.predict --step=3\n  --top_k=2` then `--json`.")
    assert inline[0][:2] == ("alexnet_jax/predict.py", ["step", "top_k"])


def test_a_wrong_module_flag_field_or_config_is_reported():
    text = (
        "    python -m alexnet_jax.predictt --workdir=W\n\n"
        "`python -m alexnet_jax.predict --wrokdir=W --step=1`\n"
        "```bash\npython launch.py --config=configs/demoo.py --config.batch_szie=3 \\\n"
        "    --workdir=W\n```\n"
    )
    assert sorted(_problems(text)) == sorted(
        [
            "no module alexnet_jax/predictt.py: python -m alexnet_jax.predictt --workdir=W",
            "alexnet_jax/predict.py defines no --wrokdir: "
            "python -m alexnet_jax.predict --wrokdir=W --step=1",
            "no config field config.batch_szie: python launch.py --config=configs/demoo.py "
            "--config.batch_szie=3 --workdir=W",
            "no config file configs/demoo.py: python launch.py --config=configs/demoo.py "
            "--config.batch_szie=3 --workdir=W",
        ]
    )


@pytest.mark.parametrize("document", README_AND_DOCS)
def test_every_command_names_a_real_module_config_flag_and_field(document):
    problems = _problems(_read(document))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", README_AND_DOCS)
def test_every_relative_link_and_image_names_a_file(document):
    folder = os.path.dirname(os.path.join(ROOT, document))
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(document))
    missing = [t for t in targets if "://" not in t and not os.path.exists(os.path.join(folder, t))]
    assert not missing, missing

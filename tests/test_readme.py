"""The README's commands must not drift from the scripts: every ```bash block's commands are
checked without running them (no imports of the scripts, no JAX).

For `python X.py ...`: X.py exists, and every --flag it is given is one X.py defines
(absl `DEFINE_*("name"` / `DEFINE_config_file("name"`, `--noname` for booleans, or argparse
`add_argument("--name"`); `--config.a.b=...` names a field of ddpm_jax.config.base_config();
a `--config FILE` exists. `--ckpt runs/<name>` must be the workdir of a train.py command
before it: its --workdir, or the default runs/<config file stem>. `bash X.sh` must exist.
"""

import os
import re
import shlex

import pytest

from ddpm_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_BUILTIN = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok", "only_check_args"}


def readme_commands(path=os.path.join(ROOT, "README.md")):
    """[(line number, argv)] of every command in the README's ```bash blocks, in order
    (continuation lines joined, `&&` chains split, comments dropped)."""
    commands, block, start = [], None, 0
    with open(path) as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if block is None:
            if line.strip().startswith("```bash"):
                block = []
        elif line.strip().startswith("```"):
            block = None
        else:
            start = i + 1
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            words = shlex.split(line, comments=True)
            chain = []
            for word in words + ["&&"]:
                if word in ("&&", "||", ";"):
                    if chain:
                        commands.append((start, chain))
                    chain = []
                else:
                    chain.append(word)
        i += 1
    return commands


def script_flags(script):
    """(flags, boolean flags) that a script defines, read from its source."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    if "cli.define_sample_flags(" in source:  # the sampling flags, DEFINEd in ddpm_jax/cli.py
        with open(os.path.join(ROOT, "ddpm_jax", "cli.py")) as f:
            source += f.read()
    names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", source))
    booleans = set(re.findall(r"DEFINE_bool(?:ean)?\(\s*[\"'](\w+)[\"']", source))
    argparse = {name.replace("-", "_") for name in re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", source)}
    return names | argparse, booleans, bool(argparse)


def has_config_field(path):
    node = base_config()
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def problems(commands):
    found, workdirs = [], set()
    for line, argv in commands:
        if argv[0] == "bash" and len(argv) > 1 and argv[1].endswith(".sh"):
            if not os.path.isfile(os.path.join(ROOT, argv[1])):
                found.append(f"README line {line}: {argv[1]} does not exist")
            continue
        if argv[0] != "python" or len(argv) < 2 or not argv[1].endswith(".py"):
            continue
        script, args = argv[1], argv[2:]
        if not os.path.isfile(os.path.join(ROOT, script)):
            found.append(f"README line {line}: {script} does not exist")
            continue
        names, booleans, is_argparse = script_flags(script)
        values = {}
        for j, arg in enumerate(args):
            if not arg.startswith("--"):
                continue
            name, _, value = arg[2:].partition("=")
            if not _ and j + 1 < len(args) and not args[j + 1].startswith("--"):
                value = args[j + 1]
            values[name] = value
            if name.startswith("config.") and "config" in names:
                if not has_config_field(name[len("config."):]):
                    found.append(f"README line {line}: {script} {arg}: no such config field")
                continue
            key = name.replace("-", "_") if is_argparse else name
            if key in names or name in ABSL_BUILTIN or (name.startswith("no") and name[2:] in booleans):
                if is_argparse and "-" in name:
                    found.append(f"README line {line}: {script} --{name}: flags are spelled with underscores")
                continue
            found.append(f"README line {line}: {script} has no flag --{name}")
        if "config" in values and values["config"] and not os.path.isfile(os.path.join(ROOT, values["config"])):
            found.append(f"README line {line}: {script} --config {values['config']} does not exist")
        if os.path.basename(script) == "train.py" and values.get("config"):
            stem = os.path.splitext(os.path.basename(values["config"]))[0]
            workdirs.add(os.path.normpath(values.get("workdir") or os.path.join("runs", stem)))
        ckpt = values.get("ckpt")
        if ckpt and ckpt.startswith("runs/"):
            parts = os.path.normpath(ckpt).split(os.sep)
            if os.path.join(*parts[:2]) not in workdirs:
                found.append(f"README line {line}: --ckpt {ckpt} is no workdir of a train.py command above it "
                             f"({', '.join(sorted(workdirs)) or 'none'})")
    return found


def test_readme_commands_have_commands():
    commands = readme_commands()
    scripts = {argv[1] for _, argv in commands if argv[0] == "python"}
    assert {"train.py", "sample.py", "evaluate.py"} <= scripts


def test_readme_commands_match_the_scripts():
    found = problems(readme_commands())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line, words", [
    ("python sample.py --ckpt some/run --clip-x0", "no flag --clip-x0"),
    ("python sample.py --ckpt some/run --bogus 3", "no flag --bogus"),
    ("python nothere.py --x 1", "does not exist"),
    ("python train.py --config configs/nothere.py", "configs/nothere.py does not exist"),
    ("python train.py --config configs/fashion.py --config.train.bogus=1", "no such config field"),
    ("python train.py --config configs/fashion_unet.py && python sample.py --ckpt runs/fashion", "no workdir"),
    ("python train.py --config configs/fashion.py --workdir runs/x && python sample.py --ckpt runs/fashion",
     "no workdir"),
    ("python benchmarks/torch_article.py sample --n-steps 10", "underscores"),
])
def test_the_checker_catches_drift(tmp_path, line, words):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n```bash\n{line}\n```\n")
    found = problems(readme_commands(str(readme)))
    assert len(found) == 1 and words in found[0], found


def test_the_checker_accepts_the_usual_forms(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("```bash\n"
                      "python train.py --config configs/fashion.py --config.train.max_steps=200   # a comment\n"
                      "python sample.py --ckpt runs/fashion/checkpoints/9 --noprogress --grid '' \\\n"
                      "  --num=4 --clip_x0\n"
                      "pip install -e . && python -m pytest -q\n"
                      "```\n")
    assert problems(readme_commands(str(readme))) == []


# ----------------------------------------------- `pip install -e .`: the version floors are tested ones

CORE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets")


def _release(version):
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def test_dependency_floors_are_the_versions_the_suite_runs_on():
    """Every dependency has a floor that the installed version meets; the core libraries' floors
    are the releases this suite runs on (same major.minor), so no floor claims an untested
    version (jax>=0.4.30 did, while parallel.py needs jax.sharding.AxisType)."""
    import tomllib
    from importlib import metadata

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    floors = {}
    for spec in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?>=([0-9.]+)", spec.replace(" ", ""))
        assert match, f"{spec}: give every dependency a >= floor"
        floors[match.group(1).lower().replace("_", "-")] = match.group(2)
    for name, floor in floors.items():
        installed = metadata.version(name)
        assert _release(installed) >= _release(floor), f"{name} {installed} is older than the floor {floor}"
    for name in CORE:
        installed = metadata.version(name)
        assert _release(floors[name])[:2] == _release(installed)[:2], (
            f"{name}>={floors[name]}: the suite runs on {installed}; make the floor the tested release")
    assert project["optional-dependencies"]["cuda"] == ["jax[cuda12]"]

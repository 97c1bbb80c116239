"""The README's commands run as written: every command block is marked runnable (and then run here, in order, in a
scratch folder) or says why it is not; `make quickstart` is the README's one-minute start; no link leaves the
repository."""
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

README = os.path.join(ROOT, "README.md")
RUNNABLE, NOT_RUN = "<!-- runnable", "<!-- not run:"
COMMAND_LANGUAGES = ("bash", "sh", "shell", "console", "python")


def readme_blocks() -> list[tuple[str, str, str]]:
    """Every fenced block of the README as (marker line before it, language, body)."""
    lines = open(README, encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append((before, opening.group(1), "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def command_lines(script: str) -> list[str]:
    """A shell block's commands: comments and blank lines dropped, continuation lines joined, spaces collapsed."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [" ".join(line.split()) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_command_block_is_marked_runnable_or_says_why_not():
    unmarked = [body.splitlines()[0] for before, lang, body in readme_blocks()
                if lang in COMMAND_LANGUAGES and not before.startswith((RUNNABLE, NOT_RUN))]
    assert not unmarked, f"command blocks without <!-- runnable --> or <!-- not run: why -->: {unmarked}"
    runnable = [b for b in readme_blocks() if b[0].startswith(RUNNABLE)]
    assert len(runnable) >= 4 and runnable[0][1] == "bash"  # the one-minute start comes first


def test_the_readme_links_nothing_outside_the_repository():
    text = open(README, encoding="utf-8").read()
    assert "../" not in text and "/work/" not in text
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("#"):
            continue
        assert not re.match(r"[a-z]+:", target), f"a link outside the repository: {target}"
        assert os.path.exists(os.path.join(ROOT, target.split("#")[0])), f"a link to a missing file: {target}"
    # the repository's own files named in backticks exist (docs/method.md, demo/make_tiny_model.py, ...)
    for path in set(re.findall(r"`((?:docs|demo|recipes|examples)/[\w./-]+\.\w+)`", text)):
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_make_quickstart_runs_the_readme_s_one_minute_start():
    lines = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("quickstart: $(STAMP)")))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(PY)", "python").replace("$(QS)", "checkpoints/quickstart"))
    quickstart = next(body for before, lang, body in readme_blocks() if before.startswith(RUNNABLE))
    assert command_lines("\n".join(recipe)) == command_lines(quickstart)


def scratch_clone(folder) -> str:
    """A folder that looks like a clone to the README's commands (links to the repository's files), whose
    `checkpoints/` is its own."""
    for name in os.listdir(ROOT):
        if name not in (".git", ".venv", "checkpoints", ".pytest_cache") and not name.startswith(".venv"):
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    return str(folder)


@pytest.mark.slow
def test_the_readme_s_runnable_commands_run_as_written(tmp_path):
    """Every block marked runnable, in the README's order, as a user would type it (`python` is the
    environment's), in a scratch clone: the one-minute start first, then the blocks that use its files."""
    clone = scratch_clone(tmp_path)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # as the README advises on a busy machine (tests share the cores)
    outputs = []
    for n, (before, lang, body) in enumerate(b for b in readme_blocks() if b[0].startswith(RUNNABLE)):
        if lang == "python":
            script = os.path.join(clone, f"readme_block_{n}.py")
            with open(script, "w", encoding="utf-8") as f:
                f.write(body + "\n")
            cmd = ["python", script]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", body]
        result = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"README block {n} ({body.splitlines()[0]}) failed:\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    actor = os.path.join(clone, "checkpoints", "quickstart", "actor")
    for name in ("README.md", "latent_comm_head.pt", "loss_curve.png", "eval_report.json", "eval_report.png"):
        assert os.path.isfile(os.path.join(actor, name)), name
    reply = outputs[0].strip().splitlines()[-1]  # the one-minute start ends with a generated reply
    assert reply.strip(), outputs[0][-2000:]
    assert os.path.isfile(os.path.join(clone, "checkpoints", "actor_model", "README.md"))  # the training example

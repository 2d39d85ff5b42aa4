"""The scripts are self-contained, so shared code is repeated between marker comments; abm_mpo.py
holds the reference copy (bcq.py for the baselines' `twin critic`) and every other copy must be
identical (`python tools/sync_blocks.py` rewrites them). A script imports no project file but sawyer_env.py and real_robot.py."""

import ast
import re

import pytest

from tests.conftest import ROOT
from tools.sync_blocks import reference_blocks

BLOCK = re.compile(r"# --- shared block: (.*?) ---\n.*?# --- end shared block ---", re.S)
SCRIPTS = ["abm_mpo.py", "abm_svg.py", "bm_mpo.py", "bcq.py", "bear.py", "collect.py"]
LEARNING_BLOCKS = {"utilities", "env", "dataset", "checkpoint", "run directory", "evaluation", "training loop"}
ALLOWED_PROJECT_IMPORTS = {"sawyer_env", "real_robot"}


def blocks(script: str) -> dict:
    text = (ROOT / script).read_text()
    found = [(m.group(1), m.group(0)) for m in BLOCK.finditer(text)]
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"{script} repeats a block: {names}"
    assert text.count("# --- shared block:") == text.count("# --- end shared block ---") == len(found), script
    return dict(found)


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_shared_blocks_are_identical_to_the_reference(script):
    reference, copies = reference_blocks(), blocks(script)
    assert copies, f"{script} has no shared block"
    for name, text in copies.items():
        assert name in reference, f"{script} has a block {name!r} that no reference file has"
        assert text == reference[name], f"block {name!r} of {script} differs from its reference; run tools/sync_blocks.py"


def test_every_shared_block_is_shared():
    counts = {name: sum(name in blocks(script) for script in SCRIPTS) for name in reference_blocks()}
    assert all(count >= 2 for count in counts.values()), counts
    assert "twin critic" in blocks("bear.py")


@pytest.mark.parametrize("script", ["abm_mpo.py", "abm_svg.py", "bm_mpo.py", "bcq.py", "bear.py"])
def test_learning_scripts_carry_the_common_blocks(script):
    assert LEARNING_BLOCKS <= set(blocks(script)), LEARNING_BLOCKS - set(blocks(script))


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_import_no_other_project_file(script):
    project = {path.stem for path in ROOT.glob("*.py")}
    tree = ast.parse((ROOT / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not (imported & project) - ALLOWED_PROJECT_IMPORTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_block_only_parses_and_calls(script):
    tree = ast.parse((ROOT / script).read_text())
    mains = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(mains) == 1 and len(mains[0].body) == 1, "the __main__ block must be one call"
    assert ast.unparse(mains[0].body[0]) == "main(train, tyro.cli(Args))"

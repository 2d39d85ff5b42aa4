"""The scripts are self-contained, so shared code is repeated between marker comments; abm_mpo.py
holds the reference copy (bcq.py for the baselines' `twin critic` and `transitions`) and every other copy
must be identical (`python tools/sync_blocks.py` rewrites them). Each script carries only blocks it calls,
the algorithm comes before one banner and the plumbing after it. A script imports no project file but
sawyer_env.py and real_robot.py."""

import ast
import re

import pytest

from tests.helpers import ROOT
from tools.sync_blocks import reference_blocks

BLOCK = re.compile(r"# --- shared block: (.*?) ---\n.*?# --- end shared block ---", re.S)
SCRIPTS = ["abm_mpo.py", "abm_svg.py", "bm_mpo.py", "bcq.py", "bear.py", "collect.py"]
# Above the banner (the algorithm) and below it (the plumbing) in every learning script.
ALGORITHM_BLOCKS = {"networks", "final return"}
PLUMBING_BLOCKS = {"utilities", "env", "dataset", "minari", "checkpoint", "run directory", "evaluation", "export"}
LEARNING_BLOCKS = ALGORITHM_BLOCKS | PLUMBING_BLOCKS
BANNER = "# TRY NOT TO MODIFY"
DEFINITION = re.compile(r"^(?:def|class) (\w+)|^([A-Z_]+) =", re.M)
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


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_block_a_script_carries_is_called_by_it(script):
    text = (ROOT / script).read_text()
    for name, body in blocks(script).items():
        defined = [a or b for a, b in DEFINITION.findall(body)]
        used = [d for d in defined if len(re.findall(rf"\b{d}\b", text)) > len(re.findall(rf"\b{d}\b", body))
                or len(re.findall(rf"\b{d}\b", body)) > 1]
        assert used, f"{script} carries the block {name!r} but calls nothing in it"


def test_bm_mpo_has_no_snippet_machinery_and_bcq_no_gaussian_policy():
    assert "snippets" not in blocks("bm_mpo.py")
    assert "snippet" not in (ROOT / "bm_mpo.py").read_text().split(BANNER)[0].lower()
    assert "gaussian policy" not in blocks("bcq.py")
    lines = {script: len((ROOT / script).read_text().splitlines()) for script in SCRIPTS[:5]}
    assert lines["bm_mpo.py"] == min(lines.values()), lines


@pytest.mark.parametrize("script", ["abm_mpo.py", "abm_svg.py", "bm_mpo.py", "bcq.py", "bear.py"])
def test_algorithm_before_the_banner_and_plumbing_after_it(script):
    text = (ROOT / script).read_text()
    assert text.count(BANNER) == 1, "one banner"
    banner = text.index(BANNER)
    positions = {name: text.index(f"# --- shared block: {name} ---") for name in blocks(script)}
    assert all(positions[name] < banner for name in ALGORITHM_BLOCKS), "the algorithm comes before the banner"
    assert all(positions[name] > banner for name in PLUMBING_BLOCKS), "the plumbing comes after the banner"
    assert text.index("\ndef train(") < banner


# Issue 13 asks for at most 500 lines of plumbing (banner to end of file); the rewrite reached 589-613, the
# trim 561-585, and the Minari hook and the device-side non-finite check brought it to 600-624. Strict: when the
# plumbing is short enough this xfail turns into a failure, and the mark must go.
@pytest.mark.xfail(strict=True, reason="issue 13: plumbing not yet cut to 500 lines (600-624 today)")
@pytest.mark.parametrize("script", ["abm_mpo.py", "abm_svg.py", "bm_mpo.py", "bcq.py", "bear.py"])
def test_plumbing_is_at_most_500_lines(script):
    text = (ROOT / script).read_text()
    banner = text.index(BANNER)
    plumbing = text[text.rindex("\n", 0, banner) + 1:].splitlines()
    assert len(plumbing) <= 500, f"{len(plumbing)} lines of plumbing"


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

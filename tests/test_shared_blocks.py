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
ALGORITHM_BLOCKS = {"args", "networks", "acting policy"}
PLUMBING_BLOCKS = {"utilities", "env", "dataset", "flags", "run"}
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
        if not defined:  # the infrastructure fields of Args
            continue
        used = [d for d in defined if len(re.findall(rf"\b{d}\b", text)) > len(re.findall(rf"\b{d}\b", body))
                or len(re.findall(rf"\b{d}\b", body)) > 1]
        assert used, f"{script} carries the block {name!r} but calls nothing in it"


def test_bm_mpo_has_no_snippet_machinery_and_bcq_no_gaussian_policy():
    assert "snippets" not in blocks("bm_mpo.py")
    assert "snippet" not in (ROOT / "bm_mpo.py").read_text().split(BANNER)[0].lower()
    assert "gaussian policy" not in blocks("bcq.py")
    lines = {script: len((ROOT / script).read_text().splitlines()) for script in LEARNING_SCRIPTS}
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


LEARNING_SCRIPTS = ["abm_mpo.py", "abm_svg.py", "bm_mpo.py", "bcq.py", "bear.py"]
# Issue 21's budgets: plumbing (banner to end of file) in every learning script, and the whole of the two MPO files.
PLUMBING_BUDGET, TOTAL_BUDGETS = 350, {"bm_mpo.py": 750, "abm_mpo.py": 850}
# What train() calls by name from the plumbing: the only names left unresolved when a script is cut at its banner.
PLUMBING_ENTRY_POINTS = {"UserError", "pick_device", "compile_losses", "record_updates", "dataset_env", "make_env", "load_data",
                         "check_args", "make_run_dir", "load_checkpoint", "Logger", "make_eval_envs",
                         "evaluate_policies", "save_checkpoint", "export_policy", "final_evaluation", "write_summary"}


def plumbing_lines(script: str) -> int:
    text = (ROOT / script).read_text()
    banner = text.index(BANNER)
    return len(text[text.rindex("\n", 0, banner) + 1:].splitlines())


@pytest.mark.xfail(strict=True, reason="issue 21's plumbing budget is not met yet: 868 lines in every script > 350")
@pytest.mark.parametrize("script", LEARNING_SCRIPTS)
def test_plumbing_is_at_most_350_lines(script):
    assert plumbing_lines(script) <= PLUMBING_BUDGET, f"{plumbing_lines(script)} lines of plumbing"


# Not met (2026-12-07, after the out-of-memory sentence and the --dataset-episodes check): bm_mpo.py 1401 lines, abm_mpo.py 1482 (issue 21 ended blocked).
@pytest.mark.xfail(strict=True, reason="issue 21's budgets are not met yet: bm_mpo.py 1401 > 750, abm_mpo.py 1482 > 850")
@pytest.mark.parametrize("script", sorted(TOTAL_BUDGETS))
def test_mpo_scripts_are_within_their_line_budgets(script):
    lines = len((ROOT / script).read_text().splitlines())
    assert lines <= TOTAL_BUDGETS[script], f"{script}: {lines} lines"


def unresolved_names(source: str) -> set:
    """Names a module's code loads but neither defines, imports, binds locally nor gets from builtins (what
    pyflakes reports as undefined, over-approximating scopes: a name bound anywhere counts as bound)."""
    import builtins

    tree = ast.parse(source)
    bound = set(dir(builtins)) | {"__file__", "__name__"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound |= set(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.NamedExpr):
            bound.add(node.target.id)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} - bound


@pytest.mark.parametrize("script", LEARNING_SCRIPTS)
def test_the_algorithm_half_stands_alone_when_cut_at_the_banner(script):
    text = (ROOT / script).read_text()
    algorithm = text[: text.rindex("\n", 0, text.index(BANNER)) + 1]
    compile(algorithm, script, "exec")
    missing = unresolved_names(algorithm)
    assert missing <= PLUMBING_ENTRY_POINTS, f"the algorithm half uses plumbing beyond the entry points: {missing - PLUMBING_ENTRY_POINTS}"
    assert {"load_data", "make_env", "Logger", "evaluate_policies", "save_checkpoint"} <= missing, missing
    assert not unresolved_names(text), "the whole script resolves every name"


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

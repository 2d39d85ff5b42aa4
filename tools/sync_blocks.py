"""Copy the shared blocks of abm_mpo.py into every other script that carries them.

The scripts are self-contained on purpose (one file per algorithm), so code that several of
them need is repeated between `# --- shared block: NAME ---` and `# --- end shared block ---`.
abm_mpo.py holds the reference copy of every block it has; bcq.py that of the blocks abm_mpo.py
does not carry (`twin critic`, `transitions`). Edit a block in its reference file, run
`python tools/sync_blocks.py`, and tests/test_shared_blocks.py checks that every copy is identical. A line `#@ NAME` in a
script is replaced by that block (how a new script asks for one).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"# --- shared block: (.*?) ---\n.*?# --- end shared block ---", re.S)


REFERENCES = ("abm_mpo.py", "bcq.py")  # a block's reference is the first of these that has it


def reference_blocks() -> dict[str, str]:
    blocks = {}
    for name in REFERENCES:
        for m in BLOCK.finditer((ROOT / name).read_text()):
            blocks.setdefault(m.group(1), m.group(0))
    return blocks


def sync(path: Path, blocks: dict[str, str]) -> bool:
    text = path.read_text()
    new = BLOCK.sub(lambda m: blocks.get(m.group(1), m.group(0)), text)
    new = re.sub(r"^#@ (.*)$", lambda m: blocks[m.group(1)], new, flags=re.M)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    blocks = reference_blocks()
    paths = [Path(p) for p in sys.argv[1:]] or sorted(p for p in ROOT.glob("*.py") if p.name != REFERENCES[0])
    for path in paths:
        if sync(path, blocks):
            print(f"updated {path.name}")

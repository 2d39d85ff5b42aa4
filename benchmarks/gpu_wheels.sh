#!/usr/bin/env bash
# The cp312 wheels a GPU machine without package access needs beyond its PyTorch image (Python 3.12 with
# torch, numpy, scipy, h5py, tensorboard, tqdm, matplotlib, pytest, ...), for benchmarks/gpu_session.py.
# Slimmed so that the wheels and the cpu preset's cheetah dataset fit the call's 64 MiB together:
# dm_control without dm_control/locomotion (the Control Suite never imports it, nor labmaze), mujoco without
# mujoco/experimental (its studio viewer, 16 MB). About 31 MB; `--peer` adds d3rlpy's (~3 MB) for
# benchmarks/peer_d3rlpy.py.
# Usage, in the repository root: benchmarks/gpu_wheels.sh [--peer]   (writes .whl/, which git ignores)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$PWD/.whl
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=(mujoco==3.17.0 dm_control==1.0.50 gymnasium==1.4.0 tyro==1.0.16 docstring-parser typeguard
      farama-notifications glfw pyopengl websockets dm-env dm-tree typing-extensions)
[ "${1:-}" = --peer ] && pins+=(d3rlpy==2.8.1 structlog dataclasses-json marshmallow gym-notices)
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@"
}
download "${pins[@]}"
# gym 0.26.2 (d3rlpy imports it) is published as source only: build its pure-Python wheel here.
[ "${1:-}" = --peer ] && python3 -m pip wheel -q --no-deps -w "$dest" gym==0.26.2
python3 - "$dest" <<'PY'
"""Drop never-imported folders from two wheels and rewrite their RECORD (path, sha256, size) to match."""
import base64, csv, hashlib, io, sys, zipfile
from pathlib import Path

DROP = {"dm_control-": ("dm_control/locomotion/",), "mujoco-": ("mujoco/experimental/",)}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    prefixes = next((p for name, p in DROP.items() if wheel.name.startswith(name)), None)
    if not prefixes:
        continue
    with zipfile.ZipFile(wheel) as source:
        kept = [i for i in source.infolist() if not i.filename.startswith(prefixes)]
        if len(kept) == len(source.infolist()):
            continue  # slimmed already
        files = {i.filename: source.read(i) for i in kept}
    record = next(name for name in files if name.endswith(".dist-info/RECORD"))
    rows = io.StringIO()
    writer = csv.writer(rows)
    for name, data in files.items():
        if name != record:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow((name, f"sha256={digest}", len(data)))
    writer.writerow((record, "", ""))
    files[record] = rows.getvalue().encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in files.items():
            target.writestr(name, data)
    print(f"slimmed {wheel.name}: dropped {', '.join(prefixes)}")
PY
du -sh "$dest"

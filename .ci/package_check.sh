#!/usr/bin/env bash
# Packaging check (make package-check; CI runs it after make test): build the wheel from the files
# git knows, install it into a fresh virtual environment, and from a folder outside the repository
# run every `onetrunk <command> --help`, `python -m tasks.classify --help`, a one-epoch classify
# on a tiny image-folder dataset made here, and a --predict with its checkpoint. Any failure
# stops it with a non-zero exit and the line "package-check FAILED".
# PYTHON=<interpreter>: the base Python of the fresh environment (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/onetrunk-package-check.XXXXXX")
STEPS=0  # steps started; each passed once the next one starts
trap 'status=$?; rm -rf "$WORK"; [ $status -eq 0 ] ||
      echo "package-check FAILED (exit $status) at step $STEPS; package-check: $((STEPS - 1)) passed, 1 failed" >&2' EXIT
START=$SECONDS
step() { STEPS=$((STEPS + 1)); echo "package-check [$((SECONDS - START))s] $STEPS. $*"; }
note() { echo "package-check [$((SECONDS - START))s]    $*"; }
# a command's output only if it fails (pip: the partial local package indexes of some machines warn at length)
quietly() {
    "$@" > "$WORK/pip.log" 2>&1 || { status=$?; cat "$WORK/pip.log" >&2; echo "failed: $*" >&2; exit $status; }
}

# Nothing of the checkout may leak into the installed environment
unset PYTHONPATH PYTHONHOME ONETRUNK_RUNS
export PYTHONNOUSERSITE=1 MPLBACKEND=Agg PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

step "copying the files git knows to $WORK/src (no build/, egg-info or .venv of the checkout)"
mkdir "$WORK/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null --ignore-failed-read -cf - -T -) | tar -xf - -C "$WORK/src"

step "creating a fresh virtual environment ($("$PYTHON" -V 2>&1))"
"$PYTHON" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
PIP=("$VPY" -m pip)

step "building the wheel (pip wheel --no-deps, isolated build)"
quietly "${PIP[@]}" wheel --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/onetrunk-*.whl)
note "built $(basename "$WHEEL")"

step "installing the wheel and its dependencies (pip install onetrunk-*.whl, as a user would)"
t=$SECONDS
quietly "${PIP[@]}" install "$WHEEL"
note "installed in $((SECONDS - t))s"
"${PIP[@]}" check

# From a folder outside the repository: only the installed package can be imported
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
ONETRUNK=$WORK/venv/bin/onetrunk
step "from $WORK/elsewhere: the packages import from the venv, the recipes are in it"
"$VPY" - "$WORK/venv" "$REPO/configs" <<'EOF'
import sys
from pathlib import Path

import backbones, heads, tasks
from tasks.engine.config import CONFIG_ROOT, locate_recipe

venv, repo_configs = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
for module in (backbones, heads, tasks):
    assert venv in Path(module.__file__).resolve().parents, f"{module.__name__} imported from {module.__file__}"
assert venv in CONFIG_ROOT.resolve().parents, f"recipes read from {CONFIG_ROOT}, not the installed package"
shipped = sorted(p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIG_ROOT.rglob("*.yaml"))
expected = sorted(p.relative_to(repo_configs).as_posix() for p in repo_configs.rglob("*.yaml"))
assert shipped == expected, f"recipes in the wheel {shipped} != configs/ {expected}"
assert locate_recipe("configs/classify/fashion_mnist_quick.yaml") == CONFIG_ROOT / "classify/fashion_mnist_quick.yaml"
print(f"imports from the installed package; {len(shipped)} recipes under {CONFIG_ROOT}")
EOF

step "onetrunk --help, each onetrunk <command> --help, python -m tasks.classify --help"
"$ONETRUNK" --help | tee "$WORK/help.txt"
for command in classify detect segment multitask export bench; do
    grep -q "^  $command " "$WORK/help.txt" || { echo "onetrunk --help does not list $command" >&2; exit 1; }
    "$ONETRUNK" "$command" --help > "$WORK/$command-help.txt" || { echo "onetrunk $command --help failed" >&2; exit 1; }
done
"$VPY" -m tasks.classify --help > "$WORK/module-help.txt"
grep -q -- "--train-images" "$WORK/module-help.txt"
status=0; "$ONETRUNK" no-such-command 2> "$WORK/unknown.txt" || status=$?
[ "$status" -eq 2 ] && [ "$(wc -l < "$WORK/unknown.txt")" -eq 1 ] || { echo "onetrunk no-such-command: exit $status" >&2; exit 1; }

step "a tiny image-folder dataset (2 classes, 32 px PNGs)"
"$VPY" - "$WORK/data" <<'EOF'
import sys
from pathlib import Path

import cv2
import numpy as np

rng = np.random.default_rng(0)
for split, n in (("train", 8), ("val", 4)):
    for label, color in (("dark", 40), ("light", 210)):
        folder = Path(sys.argv[1]) / split / label
        folder.mkdir(parents=True)
        for i in range(n):
            img = np.clip(rng.normal(color, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            assert cv2.imwrite(str(folder / f"{i}.png"), img)
EOF

step "onetrunk classify: one epoch on CPU (the installed default recipe, image folders)"
"$ONETRUNK" classify --device cpu --quiet --epochs 1 --batch-size 4 \
    --train-images "$WORK/data/train" --val-images "$WORK/data/val" --output "$WORK/elsewhere/run" \
    --set model.in_chans=3 --set model.num_classes=2 --set data.image_size=32 --set data.num_workers=0
for f in config.yaml metrics.jsonl last.pt best.pt; do
    [ -s "run/$f" ] || { echo "the run folder has no $f" >&2; ls -la run >&2; exit 1; }
done

step "python -m tasks.classify --predict with the run's checkpoint"
"$VPY" -m tasks.classify --device cpu --quiet --predict "$WORK/data/val/light/0.png" \
    --weights run/best.pt --output "$WORK/elsewhere/predict" | tee "$WORK/predict.txt"
grep -Eq "0\.png: (dark|light) [0-9.]+%, (dark|light) [0-9.]+%" "$WORK/predict.txt" \
    || { echo "--predict printed no prediction line for 0.png" >&2; exit 1; }

echo "package-check [$((SECONDS - START))s] done: the wheel builds, installs and runs from another folder"
echo "package-check: $STEPS passed, 0 failed"

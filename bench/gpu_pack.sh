#!/bin/sh
# Pack everything pdserve needs on a bare CUDA machine (no package index) into .gpu/ (git-ignored):
# ../shared/gpu/pack.sh's wheels plus the HTTP front's (starlette, uvicorn and theirs), which the
# router imports, llguidance (structured outputs), and pytest with pytest-timeout (the image's list
# of packages names no pytest; the suite's per-test timeout needs the plugin). From the project root, on a machine that reaches PyPI:
#     sh bench/gpu_pack.sh
# then carry .gpu and begin the GPU command with `. .gpu/setup.sh &&` (see bench/gpu_checks.sh).
set -eu
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 2; }
sh ../shared/gpu/pack.sh
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
--platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
for w in "starlette>=0.40" "uvicorn>=0.30" h11 click anyio sniffio idna "pytest>=8" pluggy iniconfig packaging pygments "pytest-timeout>=2.3" "llguidance==1.9.1"; do
  ${PY:-python3} -m pip download -q --no-deps $PLAT -d .gpu/whl "$w"
done
du -sh .gpu | sed 's/^/packed with the HTTP front: /'

#!/usr/bin/env bash
# Run here (with network to PyPI), after ../shared/tools/gpu-prep: adds the wheels `import deepspeed` needs
# beyond gpu-prep's list (einops, msgpack; py-cpuinfo and ninja for its op builders) to .gpu/b/whl, which
# .gpu/b/setup.sh installs on the GPU machine (Python 3.12, no network). About 0.8 MB.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -d .gpu/b/whl ] || { echo "no .gpu/b/whl: run ../shared/tools/gpu-prep first" >&2; exit 1; }
python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  einops==0.8.2 msgpack==1.2.4 py-cpuinfo==9.0.0 ninja==1.13.2 -d .gpu/b/whl
ls .gpu/b/whl | grep -E "einops|msgpack|cpuinfo|ninja"
du -sh .gpu/b | sed 's/^/carry size of .gpu\/b: /'

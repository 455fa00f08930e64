#!/usr/bin/env bash
# The GPU checks in one command, for a machine that has a GPU: the GPU tests (tests/test_gpu.py
# and the CUDA test of tests/test_center.py), then a short bench of the real GPU exchange path
# (2 emulated workers on one GPU, resnet18's size, beside pinned-copy bandwidth), one table at
# the end. About 5 minutes; without a GPU it says so in one line and exits 0.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible; nothing to check"
    exit 0
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
status=0
timeout 360 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_center.py -m gpu \
    > "$OUT/tests.txt" 2>&1 || status=$?
tests_line=$(tail -n 1 "$OUT/tests.txt")

timeout 120 "$PY" -m easgd_local scale --device cuda:0 --p 1,2 --sizes resnet18 --taus 1 \
    --steps-ms 30 --stripes 1 --seconds 4 --out "$OUT/scale" > "$OUT/scale.txt" 2>&1 || status=$?

echo "| check | result |"
echo "|---|---|"
echo "| GPU tests | ${tests_line} |"
"$PY" - "$OUT/scale/scale.json" <<'PYEOF' || status=$?
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"| GPU bench | no result ({e}) |")
    sys.exit(1)
a = r["alone"]["resnet18"]
n = 11_689_512 * 4
print(f"| device | {__import__('torch').cuda.get_device_name(0)} |")
print(f"| pinned copy host->GPU, GPU->host | {a['h2d_gbps']:.1f} GB/s, {a['d2h_gbps']:.1f} GB/s |")
print(f"| resnet18 exchange alone | {1000 * a['exchange_seconds']:.2f} ms (copies alone: "
      f"{1000 * n * (1 / a['h2d_gbps'] + 1 / a['d2h_gbps']) / 1e9:.2f} ms), locked addition "
      f"{1000 * a['held_seconds']:.2f} ms |")
for p in r["points"]:
    print(f"| p = {p['p']}, tau 1, 30 ms steps | efficiency {p['efficiency']:.3f}, exchange "
          f"{100 * p['exchange_share']:.1f}% of worker time, lock wait p99 "
          f"{1000 * p['wait_p99']:.1f} ms |")
PYEOF
echo "(details in $OUT)"
exit "$status"

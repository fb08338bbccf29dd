#!/usr/bin/env bash
# The one-command GPU check of sparseroute's CUDA kernels.
#
# On the build machine (no GPU needed), from the repository root:
#     make wheel && git rev-parse HEAD > dist/COMMIT
# On the GPU machine, from a copy of the repository root that includes dist/:
#     bash scripts/gpu-check.sh
# It needs there: Python >= 3.10, torch with CUDA, CuPy, pytest and hypothesis; no network.
# It installs the wheel from dist/ into a temporary directory (pip --no-deps --no-index), runs
# tests/gpu against that installed package, times the kernels against their torch equivalents
# (benches/gpu_bench.py), and writes into $OUT (default ./gpu-check-out):
#     record.json     device, versions, commit, pass/fail of every test, timings
#     info.txt        python -m sparseroute info
#     pytest.log, gpu-tests.xml, bench.log, timings.json, overhead.json
# Exit status: pytest's (0 when every GPU test passed).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
PYTHON="${PYTHON:-python3}"
PYTEST_TIMEOUT="${PYTEST_TIMEOUT:-360}"
mkdir -p "$OUT"

wheel=$(ls -t dist/sparseroute-*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
    echo "gpu-check: no wheel in dist/; run 'make wheel' first" >&2
    exit 2
fi
target=$(mktemp -d)
if ! "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$target" "$wheel" > "$OUT/pip.log" 2>&1; then
    cat "$OUT/pip.log" >&2
    echo "gpu-check: could not install $wheel" >&2
    exit 2
fi
export PYTHONPATH="$target"
export SPARSEROUTE_CACHE_DIR="$target/cuda-cache"
commit=$(cat dist/COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)

"$PYTHON" -m sparseroute info 2>&1 | tee "$OUT/info.txt"

# From tests/, so that `import sparseroute` finds the installed wheel, never a source tree.
(cd tests && timeout "$PYTEST_TIMEOUT" "$PYTHON" -m pytest -p no:cacheprovider gpu -q -rfEs \
    --junitxml="$OUT/gpu-tests.xml") 2>&1 | tee "$OUT/pytest.log"
tests_status=${PIPESTATUS[0]}

timeout 240 "$PYTHON" benches/gpu_bench.py --out "$OUT/timings.json" 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
# Where the host time of a small op goes (appended to bench.log).
timeout 60 "$PYTHON" benches/gpu_overhead.py --out "$OUT/overhead.json" 2>&1 | tee -a "$OUT/bench.log"
rm -f "$OUT/pip.log"  # installed fine; keep the files that come back few

"$PYTHON" - "$OUT" "$commit" "$wheel" "$tests_status" "$bench_status" <<'PY'
import json, pathlib, sys, xml.etree.ElementTree as ET

out, commit, wheel, tests_status, bench_status = sys.argv[1:]
out = pathlib.Path(out)
record = {"commit": commit, "wheel": pathlib.Path(wheel).name,
          "pytest_status": int(tests_status), "bench_status": int(bench_status)}
try:
    import torch
    record["torch"] = torch.__version__
    record["torch_cuda"] = torch.version.cuda
    record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as err:  # keep writing the record
    record["device_error"] = str(err)
try:
    import cupy
    record["cupy"] = cupy.__version__
except Exception as err:
    record["cupy"] = f"unavailable: {err}"
tests = {}
junit = out / "gpu-tests.xml"
if junit.exists():
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped" and status == "passed":
                status = "skipped"
        tests[name] = status
record["summary"] = {s: sum(v == s for v in tests.values()) for s in ("passed", "failed", "skipped")}
record["tests"] = tests
timings = out / "timings.json"
record["timings"] = json.loads(timings.read_text()) if timings.exists() else None
overhead = out / "overhead.json"
record["host_overhead"] = json.loads(overhead.read_text()) if overhead.exists() else None
(out / "record.json").write_text(json.dumps(record, indent=2))
print("gpu-check:", record["device"] if "device" in record else "?", record["summary"])
PY

exit "$tests_status"

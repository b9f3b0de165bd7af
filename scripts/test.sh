#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest. Exit code 5 ("no tests collected")
# is a failure here, not a pass. A full default run (no extra arguments) then reruns the
# numerically sensitive tests with MKL, oneDNN and ATen held to AVX2: on an AVX-512 CPU their
# products then sum in other orders, so the float tolerances (tests/tolerances.py) are seen to
# hold on more than one kernel path.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1

run_pytest() {
    .venv/bin/python -m pytest "$@"
    local rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: treating as a failure" >&2
        return 1
    fi
    return "$rc"
}

run_pytest "$@"
rc=$?
if [ "$#" -ne 0 ] || [ "$rc" -ne 0 ]; then
    exit "$rc"
fi

echo "second pass: the numerically sensitive tests on the AVX2 kernels" >&2
ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 run_pytest \
    tests/test_parity.py tests/test_convert.py tests/test_diffusion.py tests/test_moe.py \
    tests/test_layers.py tests/test_fused_adaln.py \
    tests/test_samplers.py::test_ddim_eta1_equals_ddpm_with_posterior_variance \
    tests/test_train.py::test_accumulation_equals_one_big_batch \
    tests/test_train.py::test_balance_loss_gradient_is_alpha_times_analytic

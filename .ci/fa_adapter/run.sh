#!/usr/bin/env bash
# FlashAttention's own tests of flash_attn_func (plain, kv- and qkv-packed),
# run against pyext through the stand-in flash_attn package beside this
# script:
#   FA_TEST=FILE          FlashAttention's tests/test_flash_attn.py, fetched into
#                         a git-ignored folder (e.g. .dev/); never committed
#   PYEXT_FA_BACKEND=B    cuda, triton or auto (default auto)
#   FA_SAMPLE=N           every N-th supported case (default 1: all)
# Other arguments go to pytest (e.g. -n 8 --timeout 300). Only the seven
# flash_attn_func tests are named: the whole file collects about 500k cases.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "${FA_TEST:?set FA_TEST to the path of FlashAttention tests/test_flash_attn.py}" "$work/test_flash_attn.py"
cp "$here/conftest.py" "$work/conftest.py"
tests=(output qkvpacked causal deterministic race_condition bwd_overflow bwd_transpose)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest -q -rs -p no:cacheprovider --rootdir "$work" \
    "${tests[@]/#/$work/test_flash_attn.py::test_flash_attn_}" "$@"

#!/usr/bin/env bash
# FlashAttention's own test file (FA_TEST, a copy kept out of the repo, e.g.
# .dev/fa/test_flash_attn.py) against pyext through this folder's flash_attn:
#   FA_TEST=.dev/fa/test_flash_attn.py PYEXT_FA_BACKEND=cuda FA_SAMPLE=2000 \
#       bash tests/flash_attn_adapter/run.sh -n 8
# The file parametrizes about 508,000 tests; FA_SAMPLE=N (fa_sample.py) keeps
# one in N of each test's combinations before pytest makes them (2000: 271
# tests, collected in 6 s here; all of them take 70 s only to collect).
# Extra arguments go to pytest. einops, which the file imports, is installed
# from a wheel in $PEER_WHEELS (default .whl, `make peer-wheels`) where missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${FA_TEST:?set FA_TEST to the test_flash_attn.py of FlashAttention}"
python3 -c "import einops" 2>/dev/null || python3 -m pip install -q --no-deps --no-index "${PEER_WHEELS:-.whl}"/einops-*.whl
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m pytest -q -p fa_sample -rs "$FA_TEST" "$@"

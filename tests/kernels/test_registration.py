"""The custom ops are defined once: importing the checkout's kernels/ folder as a top-level `kernels` (what
transformers' probe for the PyPI package of that name does when the repository root is on sys.path) must not
define them again, which would free the first registration under every caller (segfaults, std::bad_alloc)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import torch
from torch._library.custom_ops import OPDEFS
import moca_fast.kernels as k
ops = ["moca_fast::masked_lm_ce", "moca_fast::patch_reconstruction", "moca_fast::info_nce",
       "moca_fast::maxsim_info_nce"]
before = {{name: OPDEFS[name] for name in ops}}
import kernels  # the repository root is sys.path[0]: this is the checkout's folder, as transformers imports it
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401  (its hub-kernels probe imports `kernels`)
assert kernels.__file__.startswith({root!r}), kernels.__file__
assert all(OPDEFS[name] is before[name] for name in ops), "custom ops were redefined"
h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
k.masked_lm_cross_entropy(h, w, torch.randint(0, 11, (5,))).backward()
print("ok")
"""


def test_a_top_level_kernels_import_leaves_the_ops_alone():
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT))], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]

"""A process whose DataLoader workers leave SIGTERM to the main process still exits: at exit multiprocessing
SIGTERMs its daemonic children and joins them, which waited forever on workers that ignore SIGTERM (the test
suite itself never exited)."""

import subprocess
import sys

SCRIPT = """
import torch
from moca_fast.data.loader import stop_owned_by_main
class Numbers(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return i
loader = torch.utils.data.DataLoader(Numbers(), batch_size=2, num_workers=2, persistent_workers=True,
                                     worker_init_fn=stop_owned_by_main())
batches = iter(loader)
next(batches)  # workers alive and still referenced when the interpreter exits
print("done")
"""


def test_a_process_with_stop_ignoring_workers_exits():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
    assert "Traceback" not in result.stderr

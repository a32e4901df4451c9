"""The command line parses without torch: `moca-fast --help` must stay fast (each command imports what it needs)."""

import subprocess
import sys


def test_parsing_imports_no_torch():
    code = (
        "import sys; from moca_fast.cli import main\n"
        "try:\n    main(['cpt', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--set KEY=VALUE" in result.stdout

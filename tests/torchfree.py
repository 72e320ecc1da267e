"""Run code in a fresh interpreter where `import torch` fails, as on a machine without torch."""

import json
import os
import subprocess
import sys
import textwrap

_GUARD = """
import sys
sys.modules["torch"] = None  # `import torch` (and any torch.*) now raises ImportError
"""


def run_without_torch(code: str, **params) -> dict:
    """Runs `code` (which sets `result`, JSON-serialisable) with `params` as globals; returns `result`."""
    script = _GUARD + f"import json\nglobals().update(json.loads({json.dumps(params)!r}))\n" + textwrap.dedent(code) + (
        "\nimport json as _json\nprint('RESULT' + _json.dumps(result))\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    # The tests' folder first; the caller's PYTHONPATH (a source tree's python/) after it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])

"""research/quiet.py: TensorFlow's noise filtered, and absl lines still name their caller."""

import os
import subprocess
import sys
import textwrap

import research.files


def test_absl_lines_name_the_module_that_logged(tmp_path):
    # A fresh process, as an app starts: `import research` (quiet.install) comes before any
    # absl.logging import. One leftover of a dead pid makes research/files.py log a warning.
    code = textwrap.dedent(f"""
        import socket
        import research.files as files
        from absl import logging
        logging.use_absl_handler()
        open({str(tmp_path)!r} + "/x~" + socket.gethostname() + "~999999999~t", "w").close()
        files.remove_leftovers({str(tmp_path)!r}, "x~")
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(research.files.__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    line = [x for x in res.stderr.splitlines() if "leftover" in x]
    assert len(line) == 1, res.stderr
    assert " files.py:" in line[0] and "__init__.py" not in line[0], line[0]

"""Test helper: run a script with `os.replace` paused before it renames a temporary file into place,
so a test can kill the process in the middle of an atomic checkpoint write.

    python tests/pause_before_rename.py NAME SECONDS script.py [args...]

pauses SECONDS before every rename whose destination's name contains NAME. Runtime code holds no
test hook: the pause is patched in here, around the one call that makes a write visible.
"""
import os
import runpy
import sys
import time
from pathlib import Path

name, seconds, script, *args = sys.argv[1:]
real_replace = os.replace


def paused_replace(src, dst, *a, **k):
    if name in Path(dst).name:
        time.sleep(float(seconds))
    return real_replace(src, dst, *a, **k)


os.replace = paused_replace
sys.path.insert(0, str(Path(script).resolve().parent))
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")

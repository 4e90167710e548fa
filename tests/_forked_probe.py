"""What tests/test_forked.py runs in a forked child: it reports, as JSON on stdout, what a
process started by `python -m tests._forked_probe ARGS` should see, then exits with the code
in its first argument. An atexit handler and a non-daemon thread (joined first, as an
interpreter joins them) each add a line."""

import atexit
import json
import os
import random
import sys
import threading
import time

atexit.register(lambda: print("atexit ran", flush=True))


def late() -> None:
    time.sleep(0.2)
    print("thread joined", flush=True)


threading.Thread(target=late).start()
print(
    json.dumps(
        {
            "argv": sys.argv[1:],
            "main": __name__,
            "cwd": os.getcwd(),
            "env": os.environ.get("RETD_PROBE"),
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "parent": os.getppid(),
            "random": random.random(),
            "stdin": sys.stdin.read(),
            "torch": "torch" in sys.modules,
        }
    ),
    flush=True,
)
if sys.argv[1] == "wait":
    time.sleep(600)
sys.exit(int(sys.argv[1]))

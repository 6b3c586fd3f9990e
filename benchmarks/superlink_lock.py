"""Hold the SuperLink state database's write lock for a while during a round (fault injection).

Reproduces what a long SQLite write does to a federation on Flower 1.41: every SuperLink request
that needs to write while the lock is held waits up to the SQLite busy timeout, then fails with
"database is locked" (HTTP 500). Run it beside ``round_cost.py`` with a kept work folder:

    .venv/bin/python benchmarks/round_cost.py --set small --part-mb 64 --delta-dtype bfloat16 \\
        --bare-for 0 --work /tmp/rc &
    .venv/bin/python benchmarks/superlink_lock.py /tmp/rc 30 60

(args: work folder, seconds to hold the lock, seconds to wait after the round's clients are
sampled). Then read ``superlink.log``, each ``supernode.log`` and ``coordinator.log`` under it.
"""

import glob
import pathlib
import sqlite3
import sys
import time

W = sys.argv[1]
hold = float(sys.argv[2])
after = float(sys.argv[3])
while True:
    logs = glob.glob(f"{W}/**/coordinator.log", recursive=True)
    if logs and "sampled" in pathlib.Path(logs[0]).read_text():
        break
    time.sleep(0.5)
time.sleep(after)
db = glob.glob(f"{W}/**/superlink.db", recursive=True)[0]
con = sqlite3.connect(db, timeout=30, isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print(time.strftime("%H:%M:%S"), "write lock taken on", db, flush=True)
time.sleep(hold)
con.execute("COMMIT")
print(time.strftime("%H:%M:%S"), "released", flush=True)

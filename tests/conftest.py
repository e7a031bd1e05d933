import os
import sys
from pathlib import Path

# Spinning OpenMP waiters slow 2-thread CPU runs on a busy 2-core machine (see train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

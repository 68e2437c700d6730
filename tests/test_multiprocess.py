"""A pod is many hosts, one process each: two processes on this machine (``jax.distributed`` on
localhost, CPU collectives over gloo, 2 devices each) run the highway step data-parallel,
layer-parallel with the layer axis spanning both processes, and pipelined over 4 microbatches, each equal to one device
(``tests/two_process_worker.py`` does the work; this test starts it twice and reads its verdicts)."""

import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("two_process_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device():
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), port, str(i)], cwd=WORKER.parent, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        verdicts = [line for line in out.splitlines() if line.startswith("ok ")]
        assert len(verdicts) == 9, out[-3000:]  # data-parallel, layer-parallel, pipelined at k = 0, 2, 16

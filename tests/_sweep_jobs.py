"""Job functions for the sweep tests: fast, deterministic stand-ins for training.

They run on Dask worker processes, which import this module by name (the tests
put ``tests/`` on ``PYTHONPATH``). Each call appends one line to the file named
by ``OPX_TEST_JOB_LOG``, so tests can count how often each job ran.
"""

import os
import time


def _log(config):
    path = os.environ.get("OPX_TEST_JOB_LOG")
    if path:
        line = f"{config['data']['dim']} {config['train']['seed']} {os.getpid()}\n"
        with open(path, "a") as fh:
            fh.write(line)


def fake_job(config, run_dir):
    """Pretend the conjecture holds: rank = min(dim, 4); dim 3 with seed 1 fails."""
    _log(config)
    time.sleep(float(os.environ.get("OPX_TEST_JOB_SLEEP", "0")))
    dim, seed = config["data"]["dim"], config["train"]["seed"]
    if dim == 3 and seed == 1:
        raise ValueError(f"planted failure for dim {dim}, seed {seed}")
    with open(os.path.join(run_dir, "artifact.txt"), "w") as fh:
        fh.write("done")
    return {
        "network": config["model"]["name"],
        "span_dim": dim,
        "r_min": 4,
        "numerical_rank": min(dim, 4),
        "eigenvalues": [1.0] * dim,
        "verdict": "holds",
    }


def device_job(config, run_dir):
    """Report the device the job was told to use."""
    return {"device": config["train"]["device"], "span_dim": config["data"]["dim"]}

"""One process of a (possibly multi-process) training run, for tests/test_scaleout.py.

    python tests/_multiprocess_worker.py --out OUT --workdir W [--coordinator H:P --num-processes N --process-id I]
        [--interleave P] [overrides ...]

Runs `train_lib.train_and_evaluate` the way train.py does, and records, in OUT:
  batches_<process>.json   per training step, a fingerprint (sha1) of every image row this process read
  params_<process>.npz     the final train state's `params` and `ema_params`, gathered to the host

`--interleave P` (the 1-process reference run) reorders the rows of every global batch into
the order a P-process run puts them in: process p reads records p, p+P, ... of the batch and
the global array is the processes' parts one after another.

`--sigterm-at K --sigterm-process P`: process P sends itself a real SIGTERM during its K-th
training step (when the loop polls the stop flag), as a preemption notice that reaches one host only.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--interleave", type=int, default=1)
    parser.add_argument("--sigterm-at", type=int, default=0)
    parser.add_argument("--sigterm-process", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)

    import jax

    from microforge_jax import checkpoint, sharding, train_lib

    config, workdir = train_lib.config_for_run(None, args.overrides, args.workdir)
    train_lib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    pid = jax.process_index()
    seen: list[list[str]] = []
    real_stage_data, real_loop = train_lib._stage_data, train_lib._train_loop
    wrapped: list[int] = []  # ids of the training datasets (the ones _train_loop gets)

    def reorder(batch):
        if args.interleave > 1:
            order = np.concatenate([np.arange(p, len(batch["image"]), args.interleave) for p in range(args.interleave)])
            batch = {k: v[order] for k, v in batch.items()}
        return batch

    def record(batch):
        seen.append([hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest() for row in batch["image"]])
        return batch

    def stage_data(*a, **kw):
        return real_stage_data(*a, **kw).map(reorder)

    def train_loop(stage, *a, data, **kw):
        data = data.map(record)  # still a checkpointable grain.IterDataset
        wrapped.append(id(data))
        state = real_loop(stage, *a, data=data, **kw)
        host = sharding.to_host({"params": state["params"], "ema_params": state["ema_params"]})
        flat = jax.tree_util.tree_flatten_with_path(host)[0]
        np.savez(out / f"params_{pid}.npz", **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})
        return state

    train_lib._stage_data, train_lib._train_loop = stage_data, train_loop
    real_install = checkpoint.install_sigterm_handler

    def install_sigterm_handler(ckpt):
        event = real_install(ckpt)
        if not args.sigterm_at or pid != args.sigterm_process:
            return event
        polls = {"n": 0}

        class Probe:  # the loop polls `is_set()` once per step
            def is_set(self):
                polls["n"] += 1
                if polls["n"] == args.sigterm_at:
                    print(f"worker {pid}: SIGTERM to myself at step {polls['n']}", flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the real event
                return event.is_set()

        return Probe()

    checkpoint.install_sigterm_handler = install_sigterm_handler
    train_lib.train_and_evaluate(config, workdir)
    (out / f"batches_{pid}.json").write_text(json.dumps(seen))
    print(f"worker {pid}: done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

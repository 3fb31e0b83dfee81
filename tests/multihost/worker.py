"""One process of a two-process run (``tests/test_multihost.py`` starts two, joined by
``jax.distributed`` over gloo, 2 simulated CPU devices each): the base model loaded from a
checkpoint one process wrote, then a small GradSplitter search on
a ``modules=4`` mesh spanning both processes, its module set saved, then a composition of the
10 modules on a ``data=4`` mesh. Prints one JSON line of results, and the files this process
wrote under the output directory (seen by an audit hook).

    python worker.py PROCESS_ID PORT OUT_DIR full|kill|resume

The settings reach ``cnnsplit_jax.distributed.initialize`` through the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), as a cluster sets them.
"""

import json
import os
import signal
import sys
from pathlib import Path

pid, port, out, mode = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).resolve(), sys.argv[4]
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))

WRITES = []


def _audit(event, args):  # what this process does to files under OUT_DIR
    if event in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.move"):
        path, writing = str(args[0]), True
        if event == "open":
            mode_, flags = args[1], args[2]
            writing = (mode_ is not None and any(c in str(mode_) for c in "wax+")) or (
                mode_ is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and path.startswith(str(out)):
            WRITES.append(f"{event} {os.path.relpath(path, out)}")


sys.addaudithook(_audit)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import cnnsplit_jax as cs  # noqa: E402
from cnnsplit_jax import distributed as dist  # noqa: E402
from cnnsplit_jax.splitters import gradsplitter as gs  # noqa: E402

assert dist.initialize() and dist.process_index() == pid and dist.process_count() == 2
assert jax.device_count() == 4 and jax.local_device_count() == 2

ds = cs.load_dataset("digits")  # every process loads its own copy
data = cs.SplitData(ds.x_train[:192], ds.y_train[:192], ds.x_train[192:320], ds.y_train[192:320],
                    ds.info.mean, ds.info.std)
model, _ = cs.load_model(out / "base")  # saved by the single-process test: restored on both processes
cfg = cs.GradSplitterConfig(head_epochs=1, modularity_epochs=2, cycle_mod=1, cycle_head=1, batch_size=64,
                            lr_modularity=0.05)


def kill(p):  # a hard kill of both processes once epoch 1 is checkpointed
    if mode == "kill" and p.stage == "epoch" and p.index == 1:
        print(json.dumps({"process": pid, "killed_after_epoch": 1, "writes": WRITES}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


r = gs.split(jax.random.key(0), model, data, cfg, mesh="modules=4", ckpt_dir=out / "search",
             resume=mode == "resume", callbacks=kill)
cs.save_module_set(out / "modules", r.module_set)
comp = cs.compose([cs.Pick(r.module_set, c) for c in range(10)], mesh="data=4")
assert dict(comp.mesh.shape) == {"data": 4}
scores = cs.predict_scores(comp, ds.x_test[:50], batch_size=20)  # 20 | 4; last batch 10 (padded to 12)
print(json.dumps({"process": pid, "history": [{k: h[k] for k in ("epoch", "loss", "val_accuracy", "mean_kernels")}
                                              for h in r.history],
                  "masks": {k: np.asarray(v).astype(int).tolist() for k, v in r.module_set.masks.items()},
                  "scores": np.asarray(scores).tolist(), "writes": WRITES}), flush=True)
jax.distributed.shutdown()

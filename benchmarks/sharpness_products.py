"""One Hessian-vector product of all-MiniLM-L6-v2 on 64 SST-2 sentences (length-sorted batches of 32) per way of
computing it, interleaved, CPU seconds printed per repetition: `nice python benchmarks/sharpness_products.py REPS`
(the products of sharpness_speed.py's directions, without the batchings loop, printed as they come)."""
import sys, argparse, json, os, time
import numpy as np, torch
sys.path.insert(0, 'benchmarks')
import sharpness_speed as S
from torch.func import functional_call, grad, jvp
from sam_hf.sharpness.batches import model_loss
from sam_hf.sharpness.hessian import HessianOperator
from sam_hf.sharpness.state import math_attention, preserved_state
opts = argparse.Namespace(model=None, train_file=S.DATA, seed=0, samples=64)
model, batchings, path = S.load(opts)
batches = batchings["by length, 32"]
print("load", os.getloadavg(), flush=True)
with preserved_state(model), math_attention():
    n = sum(p.numel() for p in model.parameters())
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(n))
    rebuilt = HessianOperator(model, batches, model_loss, graph_memory=0)
    kept = HessianOperator(model, batches, model_loss)
    t = time.process_time(); ref = kept._local(v); print("build+first kept", time.process_time() - t, flush=True)
    curv = S.curvlinops_operator(model, batches)
    variants = {"rebuilt (before)": lambda: rebuilt._local(v), "kept (after)": lambda: kept._local(v),
                "curvlinops": lambda: torch.as_tensor(np.asarray(curv @ v.float()), dtype=torch.float64)}
    for rep in range(int(sys.argv[1])):
        for name, fn in variants.items():
            t = time.process_time(); out = fn(); s = time.process_time() - t
            out = out.reshape(-1).double()
            print(json.dumps({"rep": rep, "what": name, "cpu_s": s, "rel_diff": float((out - ref).norm() / ref.norm()),
                              "load": os.getloadavg()[0]}), flush=True)

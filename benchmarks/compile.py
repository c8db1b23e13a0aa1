"""torch.compile as the successor of torch.jit.trace for Pyro's ELBO: is it correct, and is it faster?

    .venv/bin/python benchmarks/compile.py --data-root ../shared/data/binarized_mnist [--steps 200]

The same VAE as benchmarks/speed.py (784-300-300-40, N(0, I), batch 100). Two training steps, each a
loss with its gradients and one torch.optim.Adam step:
  python     Pyro's Trace_ELBO, uncompiled (--no-jit)
  compile    torch.compile of a function returning Trace_ELBO().differentiable_loss(model, guide, x)
(pyro-vae's default, Pyro's JitTrace_ELBO through torch.jit.trace, is timed by speed.py's step workload
against both of these sides' twin.)
Printed per variant: the first call's seconds (compilation), the median step time over --steps steps after
warm-up, the graph breaks torch._dynamo reports, and the loss on a fixed batch with fixed noise against the
Python ELBO's (correctness). Results go to benchmarks/results/compile-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

import pyro_vae


def build():
    cfg = pyro_vae.Config(dataset="binarized-mnist", latent_dim=40, hidden_dim=300, hidden_layers=2, batch_size=100)
    torch.manual_seed(0)
    return pyro_vae.build_vae(cfg, 784, (28, 28), True)


def variant(name: str, vae):
    common = dict(num_particles=1, vectorize_particles=True, max_plate_nesting=1)
    elbo = Trace_ELBO(**common)
    loss = lambda x: elbo.differentiable_loss(vae.model, vae.guide, x)  # noqa: E731
    return torch.compile(loss) if name == "compile" else loss


def measure(name: str, data, steps: int) -> dict:
    pyro.clear_param_store()
    vae = build()
    loss_fn = variant(name, vae)
    optim = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = data.train[: 100 * (steps + 3)]
    started = time.perf_counter()
    loss_fn(x[:100]).backward()
    first = time.perf_counter() - started
    optim.zero_grad()
    times = []
    for i in range(1, steps + 3):
        started = time.perf_counter()
        loss = loss_fn(x[i * 100 : (i + 1) * 100])
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    probe = data.valid[:100]
    with torch.no_grad():
        torch.manual_seed(7)
        value = loss_fn(probe).item()
        torch.manual_seed(7)
        reference = Trace_ELBO(vectorize_particles=True, max_plate_nesting=1).differentiable_loss(vae.model, vae.guide,
                                                                                               probe).item()
    out = {"first_call_seconds": first, "median_step_seconds": statistics.median(times[2:]),
           "loss": value, "python_loss_same_noise": reference}
    if name == "compile":
        import torch._dynamo as dynamo

        dynamo.reset()
        explanation = dynamo.explain(variant("python", vae))(probe)
        out["graph_breaks"] = explanation.graph_break_count
        out["graph_break_reasons"] = sorted({str(b.reason)[:120] for b in explanation.break_reasons})[:8]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    data = pyro_vae.load_dataset("binarized-mnist", args.data_root)
    results = {}
    for name in ("python", "compile"):
        try:
            results[name] = measure(name, data, args.steps)
        except Exception as e:  # a variant that does not run is a result too
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(name, json.dumps(results[name], indent=None)[:600], flush=True)
    out = Path(__file__).parent / "results" / "compile-cpu.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "pyro": pyro.__version__,
                               "threads": torch.get_num_threads(), "steps": args.steps, "results": results}, indent=2)
                   + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

"""Speed: pyro-vae against an honest plain-PyTorch twin, timed side by side in one process.

    .venv/bin/python benchmarks/speed.py --data-root ../shared/data/binarized_mnist [--repeats 9] [--device cpu]
    .venv/bin/python benchmarks/speed.py --data-root ... --only mog500 vamp500 floor     # some workloads again

The model: static binarized MNIST, the MLP VAE 784-300-300-40 (softplus), Bernoulli likelihood, batch
100, one-particle ELBO, Adam (lr 1e-3) with every gradient element clamped to +-10 (pyro-vae's default
``clip_norm``; the twin clamps the same way, with ``clip_grad_value_``).

The pyro-vae side is what ``pyro-vae train`` and ``pyro-vae evaluate`` run: ``inference.step.TrainingStep``
(the direct ELBO, one fused ``torch.optim.Adam``; compiled with torch.compile in runs of 30,000 steps or
more), ``pyro_vae.train`` itself for the end-to-end epoch, and ``pyro_vae.iw_log_likelihood``. The plain
side is what a speed-minded user would write instead: tensor arithmetic for the ELBO (reparameterised z,
the Gaussian densities by hand, BCE with logits), a mixture prior's density as two matrix products and a
logsumexp, one fused ``torch.optim.Adam``, no validation of distribution arguments; against a compiled
pyro-vae, the same loss through ``torch.compile`` with its default options. It shares the networks'
initial weights, nothing else.

Workloads (--train-images images an epoch, --eval-images test images):
  step            one epoch of training steps, N(0, I), the direct ELBO uncompiled (runs under 30,000 steps)
  step-compiled   the same compiled with torch.compile (longer runs), against the twin compiled likewise
  step-pyro       --elbo pyro: Pyro's Trace_ELBO compiled with torch.jit (JitTrace_ELBO, the default until
                  2026-12), against the uncompiled twin
  step-no-jit     --elbo pyro --no-jit: Pyro's Python Trace_ELBO
  epoch           end to end: pyro_vae.train epochs (steps, validation ELBO on --valid-images, checkpoint,
                  history, run.json) against the twin's epoch plus its validation ELBO
  epoch-compiled  the same with the step compiled on both sides (as a run of 30,000 steps or more trains)
  mog500          one epoch of steps with a mixture of K = 500 Gaussians in d = 40
  vamp500         one epoch of steps with the VampPrior, K = 500 pseudo-inputs
  floor           the VampPrior's floor: the N(0, I) step plus the encoder's forward and backward pass on the
                  K = 500 pseudo-inputs (to its weights and to the pseudo-inputs, which the VampPrior learns),
                  each step (pyro-vae side) against the twin doing the same
  mog500-compiled, vamp500-compiled, floor-compiled: the three above with the step compiled on both sides
  eval            importance-weighted log p(x), K = 1000
Each runs --repeats times, the two sides back to back, alternating which goes first (the end-to-end
epoch: pyro-vae's epoch, then the twin's, inside pyro_vae.train's on_epoch_end). Printed are the medians
and the median of the paired ratios pyro-vae / twin with quartiles, and the ratios across workloads
the goals name (mog500 / step, vamp500 / floor), paired per repeat. Peak memory is measured per
workload in a fresh child process. Results go to benchmarks/results/speed-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyro
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

import pyro_vae
from pyro_vae.data import Dataset
from pyro_vae.inference.metrics import iw_log_likelihood
from pyro_vae.inference.objectives import KLWeight
from pyro_vae.inference import step as step_module
from pyro_vae.inference.step import TrainingStep

HIDDEN, LATENT, BATCH, K_EVAL, K_MIX = 300, 40, 100, 1000, 500
WORKLOADS = ("step", "step-compiled", "step-pyro", "step-no-jit", "epoch", "epoch-compiled", "mog500", "vamp500",
             "floor", "mog500-compiled", "vamp500-compiled", "floor-compiled", "eval")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def config(prior="normal", device="cpu", **kw):
    return pyro_vae.Config(dataset="binarized-mnist", latent_dim=LATENT, hidden_dim=HIDDEN, hidden_layers=2,
                           batch_size=BATCH, prior=prior, prior_components=K_MIX, device=device, **kw)


# --------------------------------------------------------------------------- the plain-PyTorch twin


class Twin(nn.Module):
    """The same VAE written by hand: its own copies of the networks (and pseudo-inputs, mixture), the
    ELBO in tensor arithmetic."""

    def __init__(self, vae, prior: str):
        super().__init__()
        self.encoder = vae.guide_dist.encoder
        self.decoder = vae.decoder
        self.prior_kind = prior
        if prior == "mog":
            self.logits, self.means, self.log_scales = vae.prior.logits, vae.prior.means, vae.prior.log_scales
        if prior == "vamp":
            self.raw_pseudo_inputs = vae.prior.raw_pseudo_inputs

    def q(self, x):
        h = self.encoder(x)
        return h[..., :LATENT], 1e-4 + softplus(h[..., LATENT:])

    def log_prior(self, z):
        if self.prior_kind == "normal":
            return (-0.5 * z * z).sum(-1) - LATENT * HALF_LOG_2PI
        if self.prior_kind == "mog":
            logits, loc, scale = self.logits, self.means, self.log_scales.exp()
        else:  # vamp: the encoder's posteriors at the pseudo-inputs, uniform weights
            loc, scale = self.q(torch.sigmoid(self.raw_pseudo_inputs))
            logits = torch.zeros(loc.shape[0], device=loc.device)
        precision = scale.pow(-2)
        const = (torch.log_softmax(logits, -1) - 0.5 * (loc * loc * precision).sum(-1) - scale.log().sum(-1)
                 - LATENT * HALF_LOG_2PI)
        flat = z.reshape(-1, LATENT)
        quad = (flat * flat) @ (-0.5 * precision).T + flat @ (loc * precision).T
        return torch.logsumexp(quad + const, -1).reshape(z.shape[:-1])

    def log_weights(self, x, k=None):
        mu, sigma = self.q(x)
        eps = torch.randn((k, *mu.shape) if k else mu.shape, device=x.device)
        z = mu + sigma * eps
        target = x if k is None else x.expand(k, *x.shape)
        log_lik = -binary_cross_entropy_with_logits(self.decoder(z), target, reduction="none").sum(-1)
        log_q = (-0.5 * eps * eps - sigma.log()).sum(-1) - LATENT * HALF_LOG_2PI
        return log_lik + self.log_prior(z) - log_q


def twin_optimizer(params, lr=1e-3):
    """The twin's Adam: the fastest torch offers, one fused kernel for every tensor (on this machine's CPU
    over the VampPrior recipe's 1.1M parameters, the default for-loop Adam took 4.3 ms a step, foreach 7.7 ms,
    fused 1.0 ms)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def twin_loss(twin, xb):
    return -twin.log_weights(xb).sum()


def twin_step(twin, optim, xb, clip=10.0, loss_fn=twin_loss):
    loss = loss_fn(twin, xb)
    loss.backward()
    torch.nn.utils.clip_grad_value_(twin.parameters(), clip, foreach=True)
    optim.step()
    optim.zero_grad(set_to_none=True)


def epochs_of(step_fn, x):
    def epoch():
        perm = torch.randperm(len(x), device=x.device)
        for i in range(0, len(x), BATCH):
            step_fn(x[perm[i : i + BATCH]])
    return epoch


@torch.no_grad()
def twin_elbo(twin, x):
    return torch.cat([twin.log_weights(x[i : i + 1000]) for i in range(0, len(x), 1000)]).mean().item()


@torch.no_grad()
def twin_iw(twin, x, k=K_EVAL):
    out = []
    for i in range(0, len(x), 25):
        out.append(torch.logsumexp(twin.log_weights(x[i : i + 25], k), 0) - math.log(k))
    return torch.cat(out)


# --------------------------------------------------------------------------- the two sides of each workload


def _pair(data, device, prior="normal", compiled=False, **kw):
    """(pyro-vae's VAE and training step, the twin and its step), from the same initial weights, each
    compiled or not, pyro-vae's in a Pyro param store of its own (a torch.jit-compiled ELBO looks its
    parameters up by name). ``kw``: Config fields (elbo, jit)."""
    cfg = config(prior, device.type, **kw)
    torch.manual_seed(0)
    vae = pyro_vae.build_vae(cfg, data.dim, data.image_shape, data.binary).to(device)
    copy = pyro_vae.build_vae(cfg, data.dim, data.image_shape, data.binary).to(device)
    copy.load_state_dict(vae.state_dict())
    twin = Twin(copy, prior)
    store = pyro.get_param_store()
    with store.scope() as state:
        step = TrainingStep(vae, cfg, KLWeight(1.0, 0.0, device), jit=compiled or None)
        started = time.perf_counter()
        step.compile([data.train[:BATCH].to(device)], seed=0)
    compile_seconds = time.perf_counter() - started if step.compiler else None

    def pyro_step(xb):
        with store.scope(state):
            step.step(xb)

    loss_fn = torch.compile(twin_loss, dynamic=False) if compiled else twin_loss
    optim = twin_optimizer(twin.parameters())
    return vae, pyro_step, twin, lambda xb: twin_step(twin, optim, xb, loss_fn=loss_fn), compile_seconds


def workloads(data, device, args):
    """name -> (pyro-vae function, twin function, compile seconds); the end-to-end epochs separately."""
    x = data.train[: args.train_images].to(device)
    out = {}
    for name, prior, kw in (("step", "normal", {}), ("step-compiled", "normal", {"compiled": True}),
                            ("step-pyro", "normal", {"elbo": "pyro"}), ("step-no-jit", "normal", {"elbo": "pyro", "jit": False}),
                            ("mog500", "mog", {}), ("vamp500", "vamp", {}),
                            ("mog500-compiled", "mog", {"compiled": True}), ("vamp500-compiled", "vamp", {"compiled": True})):
        if name in args.only:
            _, pyro_step, _, plain_step, seconds = _pair(data, device, prior, **kw)
            out[name] = (epochs_of(pyro_step, x), epochs_of(plain_step, x), seconds)
    for name, compiled in (("floor", False), ("floor-compiled", True)):
        if name in args.only:
            out[name] = _floor(data, device, x, compiled)
    if "eval" in args.only:
        torch.manual_seed(0)
        vae = pyro_vae.build_vae(config(), data.dim, data.image_shape, data.binary).to(device).eval()
        twin = Twin(vae, "normal")
        test_x = data.test[: args.eval_images].to(device)
        out["eval"] = (lambda: iw_log_likelihood(vae, test_x, K_EVAL), lambda: twin_iw(twin, test_x), None)
    return out


def _floor(data, device, x, compiled):
    """The VampPrior's floor: the N(0, I) step, then the encoder's forward and backward pass on the K
    pseudo-inputs, to its weights and to the pseudo-inputs themselves (the VampPrior learns them)."""
    vae, pyro_step, twin, plain_step, seconds = _pair(data, device, "normal", compiled)
    u = torch.sigmoid(pyro_vae.build_vae(config("vamp"), data.dim, data.image_shape, data.binary)
                      .prior.raw_pseudo_inputs.detach()).to(device).requires_grad_()

    def pyro_floor(xb):
        pyro_step(xb)
        vae.guide_dist.encoder(u).sum().backward()

    def twin_floor(xb):
        twin.encoder(u).sum().backward()
        plain_step(xb)

    return epochs_of(pyro_floor, x), epochs_of(twin_floor, x), seconds


def end_to_end(data, device, args, compiled=False) -> dict:
    """pyro_vae.train for --repeats + 1 epochs on --train-images images (validation on --valid-images);
    after each of its epochs, inside on_epoch_end, once pyro-vae's writer thread has written the epoch's
    files (counted in pyro-vae's time), the twin's epoch and validation ELBO. The first pair is
    warm-up (it holds pyro-vae's set-up and compilation). ``compiled``: both steps compiled, pyro-vae's as
    a run of COMPILE_MIN_STEPS or more steps compiles it."""
    subset = Dataset("binarized-mnist", data.train[: args.train_images], data.valid[: args.valid_images],
                     data.test[: args.valid_images], data.image_shape, data.binary)
    cfg = config("normal", device.type, epochs=args.repeats + 1, patience=0)
    torch.manual_seed(0)
    twin = Twin(pyro_vae.build_vae(cfg, data.dim, data.image_shape, data.binary).to(device), "normal")
    optim = twin_optimizer(twin.parameters())
    loss_fn = torch.compile(twin_loss, dynamic=False) if compiled else twin_loss
    x, valid = subset.train.to(device), subset.valid.to(device)
    plain_epoch = epochs_of(lambda xb: twin_step(twin, optim, xb, loss_fn=loss_fn), x)
    times = {"pyro-vae": [], "plain": []}
    mark = [time.perf_counter()]

    def on_epoch_end(epoch, record):
        # pyro-vae's epoch includes writing its files: the writer thread would otherwise run during the
        # twin's epoch and bill it for them, so it is waited for here and counted on pyro-vae's side (a
        # conservative figure: in a run of its own the writes overlap pyro-vae's next epoch instead)
        for thread in threading.enumerate():
            if thread.name == "pyro-vae-writes":
                thread.join()
        sync(device)
        times["pyro-vae"].append(time.perf_counter() - mark[0])
        started = time.perf_counter()
        plain_epoch()
        twin_elbo(twin, valid)
        sync(device)
        times["plain"].append(time.perf_counter() - started)
        mark[0] = time.perf_counter()

    threshold = step_module.COMPILE_MIN_STEPS
    step_module.COMPILE_MIN_STEPS = 0 if compiled else math.inf
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = pyro_vae.train(cfg, Path(tmp) / "run", data=subset, progress=False, on_epoch_end=on_epoch_end)
    finally:
        step_module.COMPILE_MIN_STEPS = threshold
    assert run.info["compiled"] == compiled, run.info
    return {k: v[1:] for k, v in times.items()}


# --------------------------------------------------------------------------- timing, memory, results


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def RESULTS(device: str) -> Path:
    return Path(__file__).parent / "results" / f"speed-{device}.json"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def summarize(times: dict, repeats: int, compile_seconds=None) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = sorted(a / b for a, b in zip(times["pyro-vae"], times["plain"]))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"date": time.strftime("%Y-%m-%d"), "repeats": repeats, "median_seconds": med,
            "ratio": statistics.median(ratios), "ratio_quartiles": [q1, q3], "compile_seconds": compile_seconds,
            "all_seconds": times}


def paired(a: list, b: list) -> dict:
    """The median and quartiles of a_i / b_i (two workloads timed in the same repeats)."""
    ratios = sorted(x / y for x, y in zip(a, b))
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ratio": statistics.median(ratios), "ratio_quartiles": [q1, q3]}


def run_interleaved(jobs: dict, repeats: int, device) -> dict:
    """Every workload once per repeat, both sides, alternating which side goes first."""
    times = {name: {"pyro-vae": [], "plain": []} for name in jobs}
    for fns in jobs.values():  # warm-up
        fns[0](), fns[1]()
    for r in range(repeats):
        for name, (pyro_fn, plain_fn, _) in jobs.items():
            sides = (("pyro-vae", pyro_fn), ("plain", plain_fn))
            for side, fn in sides if r % 2 == 0 else sides[::-1]:
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[name][side].append(time.perf_counter() - t)
        print(f"repeat {r + 1}/{repeats} done", flush=True)
    return times


def _measure_memory(args, names, results) -> None:
    """Each workload once in a fresh child process: its peak resident memory above the loaded baseline."""
    for name in names:
        for side in ("pyro", "plain"):
            child = subprocess.run([sys.executable, __file__, "--data-root", args.data_root, "--device", args.device,
                                    "--train-images", str(args.train_images), "--eval-images", str(args.eval_images),
                                    "--only", name, "--memory-of", f"{name}:{side}"],
                                   capture_output=True, text=True, check=True)
            mem = json.loads(child.stdout.strip().splitlines()[-1])
            results[name][f"memory_{side}"] = mem
            print(f"{name:12s} {side:6s} workload peak {mem['workload_peak_mib']:.0f} MiB above "
                  f"{mem['baseline_rss_mib']:.0f} MiB loaded"
                  + (f", GPU peak {mem['gpu_peak_mib']:.0f} MiB" if mem["gpu_peak_mib"] else ""), flush=True)


def memory_child(jobs, name: str, side: str, device) -> None:
    gc.collect()
    before = _rss_mib()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    peak, done = [before], threading.Event()

    def watch():  # the process's resident set, sampled every 5 ms while the workload runs
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    watcher = threading.Thread(target=watch)
    watcher.start()
    jobs[name][0 if side == "pyro" else 1]()
    sync(device)
    done.set()
    watcher.join()
    gpu = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"peak_rss_mib": peak[0], "baseline_rss_mib": before, "workload_peak_mib": peak[0] - before,
                      "gpu_peak_mib": gpu}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--valid-images", type=int, default=10_000)
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="these workloads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child mode: run one workload, print max RSS
    args = parser.parse_args()
    device = torch.device(args.device)
    data = pyro_vae.load_dataset("binarized-mnist", args.data_root)
    if args.memory_of:
        name, side = args.memory_of.split(":")
        memory_child(workloads(data, device, args), name, side, device)
        return
    jobs = workloads(data, device, args)
    times = run_interleaved(jobs, args.repeats, device) if jobs else {}
    results = {name: summarize(t, args.repeats, jobs[name][2]) for name, t in times.items()}
    for name, compiled in (("epoch", False), ("epoch-compiled", True)):
        if name in args.only:
            results[name] = summarize(end_to_end(data, device, args, compiled), args.repeats)
    for r in results.values():
        r["train_images"], r["command"] = args.train_images, "benchmarks/speed.py " + " ".join(sys.argv[1:])
    for name, r in results.items():
        med = r["median_seconds"]
        print(f"{name:12s} pyro-vae {med['pyro-vae']:.3f} s   twin {med['plain']:.3f} s   ratio {r['ratio']:.3f} "
              f"(quartiles {r['ratio_quartiles'][0]:.3f}-{r['ratio_quartiles'][1]:.3f})", flush=True)
    goals = {}
    for name, over in (("mog500", "step"), ("vamp500", "floor"), ("mog500-compiled", "step-compiled"),
                       ("vamp500-compiled", "floor-compiled")):
        if name in times and over in times:
            goals[f"{name}/{over}"] = paired(times[name]["pyro-vae"], times[over]["pyro-vae"])
            print(f"{name}/{over} (pyro-vae): {goals[f'{name}/{over}']['ratio']:.3f}", flush=True)
    if not args.no_memory:
        _measure_memory(args, list(jobs), results)
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = RESULTS(args.device)
    old = json.loads(out.read_text()) if out.exists() else {}
    record = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": machine,
              "torch": torch.__version__, "pyro": pyro.__version__, "train_images": args.train_images,
              "valid_images": args.valid_images, "eval_images": args.eval_images,
              "command": "benchmarks/speed.py " + " ".join(sys.argv[1:]),
              "results": {**old.get("results", {}), **results}, "goals": {**old.get("goals", {}), **goals}}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

"""Speed: pyro-vae against the same VAE hand-written in plain PyTorch, timed in one process, interleaved.

    .venv/bin/python benchmarks/speed.py --data-root ../shared/data/binarized_mnist [--repeats 9] [--device cpu]

Workloads (static binarized MNIST, the standard-normal MLP VAE 784-300-300-40, Bernoulli likelihood,
batch 100, one-particle ELBO, Adam with each gradient element clamped to ±10 as ClippedAdam does).
The pyro-vae side is the training step of `pyro-vae train` itself (`inference.train.make_svi`), the
plain side the same VAE written by hand, sharing its networks and initial weights:
  train          one epoch (--train-images images): SVI steps on the compiled ELBO (JitTrace_ELBO, the default)
  train-no-jit   the same with --no-jit (Trace_ELBO)
  vamp           one training epoch with the VampPrior (K = 50 pseudo-inputs), compiled
  vamp-no-jit    the same with --no-jit
  eval           importance-weighted log p(x), K = 1000, on --eval-images test images
Each is run --repeats times, pyro-vae and plain back to back (alternating which goes first); printed
are the median time of each side and the median of the paired ratios pyro-vae / plain, with their
quartiles (pairing cancels the slow drifts of a shared machine). Peak memory (max RSS) is measured
per workload in a fresh child process. Results go to benchmarks/results/speed-<device>.json.
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
import threading
import time
from pathlib import Path

import pyro
import torch
from torch import nn
from torch.nn.functional import softplus

import pyro_vae
from pyro_vae.inference.metrics import iw_log_likelihood
from pyro_vae.inference.objectives import KLWeight
from pyro_vae.inference.train import compile_steps, make_svi

HIDDEN, LATENT, BATCH, K_EVAL, VAMP_K = 300, 40, 100, 1000, 50


def config(prior="normal", device="cpu", jit=True):
    return pyro_vae.Config(dataset="binarized-mnist", latent_dim=LATENT, hidden_dim=HIDDEN, hidden_layers=2,
                           batch_size=BATCH, prior=prior, prior_components=VAMP_K, device=device, jit=jit)


# --------------------------------------------------------------------------- the plain-PyTorch twin


class PlainVAE(nn.Module):
    """The same networks, likelihood and ELBO estimator as pyro-vae's MLP VAE, written by hand."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.guide_dist.encoder
        self.decoder = vae.decoder
        self.vamp = vae.prior if hasattr(vae.prior, "raw_pseudo_inputs") else None

    def q(self, x):
        h = self.encoder(x)
        return torch.distributions.Normal(h[..., :LATENT], 1e-4 + softplus(h[..., LATENT:]), validate_args=False)

    def log_prior(self, z):
        if self.vamp is None:
            return torch.distributions.Normal(0.0, 1.0, validate_args=False).log_prob(z).sum(-1)
        qk = self.q(torch.sigmoid(self.vamp.raw_pseudo_inputs))  # batch (K, d)
        lp = qk.log_prob(z.unsqueeze(-2)).sum(-1)  # (..., K)
        return torch.logsumexp(lp, -1) - math.log(lp.shape[-1])

    def log_weights(self, x, k=1):
        q = self.q(x)
        z = q.rsample((k,))
        log_lik = -nn.functional.binary_cross_entropy_with_logits(self.decoder(z), x.expand(k, *x.shape),
                                                                  reduction="none").sum(-1)
        return log_lik + self.log_prior(z) - q.log_prob(z).sum(-1)


def plain_epoch(plain, optim, x):
    perm = torch.randperm(len(x), device=x.device)
    for i in range(0, len(x), BATCH):
        xb = x[perm[i : i + BATCH]]
        loss = -plain.log_weights(xb).sum()
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(plain.parameters(), 10.0)  # as ClippedAdam: clamp each gradient element
        optim.step()


@torch.no_grad()
def plain_iw(plain, x):
    out = []
    for i in range(0, len(x), 25):
        w = plain.log_weights(x[i : i + 25], K_EVAL)
        out.append(torch.logsumexp(w, 0) - math.log(K_EVAL))
    return torch.cat(out)


# --------------------------------------------------------------------------- the pyro-vae side


def pyro_training(vae, cfg, x):
    """pyro-vae's own training step (make_svi), compiled beforehand as `pyro-vae train` does; returns
    one epoch as a function, and the compile time. Each workload keeps its own Pyro param store
    (``ParamStoreDict.scope``): the workloads' parameters share names, and a compiled ELBO looks its
    parameters up by name."""
    store = pyro.get_param_store()
    with store.scope() as state:
        svi, extra = make_svi(vae, cfg, KLWeight(cfg.beta, cfg.warmup_epochs, x.device))
        started = time.perf_counter()
        if cfg.jit:
            compile_steps(svi, vae, [x[:BATCH]], extra, seed=0)
        compile_seconds = time.perf_counter() - started if cfg.jit else None

    def epoch():
        with store.scope(state):
            perm = torch.randperm(len(x), device=x.device)
            for i in range(0, len(x), BATCH):
                svi.step(x[perm[i : i + BATCH]], *extra)

    return epoch, compile_seconds


def workloads(data, device, args):
    """name -> (pyro-vae epoch, plain epoch, pyro-vae compile seconds)"""
    train_x = data.train[: args.train_images].to(device)
    test_x = data.test[: args.eval_images].to(device)
    out = {}
    for name, prior, jit in (("train", "normal", True), ("train-no-jit", "normal", False),
                             ("vamp", "vamp", True), ("vamp-no-jit", "vamp", False)):
        if args.only and name not in args.only:
            continue
        cfg = config(prior, device.type, jit)
        torch.manual_seed(0)
        vae = pyro_vae.build_vae(cfg, data.dim, data.image_shape, data.binary).to(device)
        twin = pyro_vae.build_vae(cfg, data.dim, data.image_shape, data.binary).to(device)
        twin.load_state_dict(vae.state_dict())
        plain = PlainVAE(twin)
        optim = torch.optim.Adam(plain.parameters(), lr=1e-3)
        epoch, compile_seconds = pyro_training(vae, cfg, train_x)
        out[name] = (epoch, lambda p=plain, o=optim: plain_epoch(p, o, train_x), compile_seconds)
    if not args.only or "eval" in args.only:
        torch.manual_seed(0)
        vae = pyro_vae.build_vae(config(), data.dim, data.image_shape, data.binary).to(device).eval()
        plain = PlainVAE(vae)
        out["eval"] = (lambda: iw_log_likelihood(vae, test_x, K_EVAL, batch_size=25), lambda: plain_iw(plain, test_x),
                       None)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def RESULTS(device: str) -> Path:
    return Path(__file__).parent / "results" / f"speed-{device}.json"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure_memory(args, jobs, results) -> None:
    """Each workload once in a fresh child process: its peak resident memory above the loaded baseline."""
    for name in jobs:
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=("train", "train-no-jit", "vamp", "vamp-no-jit", "eval"),
                        help="run only these workloads")
    parser.add_argument("--memory-only", action="store_true", help="re-measure memory into the last results file")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child mode: run one workload, print max RSS
    args = parser.parse_args()
    device = torch.device(args.device)
    data = pyro_vae.load_dataset("binarized-mnist", args.data_root)
    jobs = workloads(data, device, args)

    if args.memory_of:
        name, side = args.memory_of.split(":")
        gc.collect()
        before = _rss_mib()
        if device.type == "cuda":  # the workloads were built (and compiled) above: count only this one
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
        print(json.dumps({"peak_rss_mib": peak[0], "baseline_rss_mib": before,
                          "workload_peak_mib": peak[0] - before, "gpu_peak_mib": gpu}))
        return
    if args.memory_only:
        results = json.loads(RESULTS(args.device).read_text())["results"]
        _measure_memory(args, jobs, results)
        record = json.loads(RESULTS(args.device).read_text())
        record["results"] = results
        RESULTS(args.device).write_text(json.dumps(record, indent=2) + "\n")
        return

    results = {}
    for name, (pyro_fn, plain_fn, compile_seconds) in jobs.items():
        pyro_fn(), plain_fn()  # warm-up
        times = {"pyro-vae": [], "plain": []}
        for r in range(args.repeats):
            sides = (("pyro-vae", pyro_fn), ("plain", plain_fn))
            for side, fn in sides if r % 2 == 0 else sides[::-1]:
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[side].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = sorted(a / b for a, b in zip(times["pyro-vae"], times["plain"]))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        ratio = statistics.median(ratios)
        results[name] = {"date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "median_seconds": med,
                         "ratio": ratio, "ratio_quartiles": [q1, q3], "compile_seconds": compile_seconds,
                         "all_seconds": times}
        print(f"{name:12s} pyro-vae {med['pyro-vae']:.3f} s   plain {med['plain']:.3f} s   "
              f"ratio {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f})"
              + (f"   compile {compile_seconds:.2f} s once" if compile_seconds is not None else ""), flush=True)
    _measure_memory(args, jobs, results)
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = RESULTS(args.device)
    if args.only and out.exists():  # a partial run replaces only its own workloads
        results = {**json.loads(out.read_text())["results"], **results}
    record = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": machine,
              "torch": torch.__version__, "pyro": pyro.__version__,
              "train_images": args.train_images, "eval_images": args.eval_images, "results": results}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

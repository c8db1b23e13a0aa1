"""Speed: pyro-vae against the same VAE hand-written in plain PyTorch, timed in one process, interleaved.

    .venv/bin/python benchmarks/speed.py --data-root ../shared/data/binarized_mnist [--repeats 5] [--device cpu]

Workloads (static binarized MNIST, the standard-normal MLP VAE 784-300-300-40, Bernoulli likelihood,
batch 100, Trace_ELBO with one particle, Adam with per-parameter gradient clipping):
  train    one epoch (--train-images images) of SVI steps vs hand-written loss.backward()/step()
  train-jit  the same with pyro-vae's --jit (JitTrace_ELBO)
  eval     importance-weighted log p(x), K = 1000, on --eval-images test images
  vamp     one training epoch with the VampPrior (K = 50 pseudo-inputs) vs its plain twin
Each is repeated --repeats times, pyro-vae and plain alternating; the median time of each and the
ratio pyro-vae / plain are printed. Peak memory (max RSS) is measured per workload in a fresh child
process. Results go to benchmarks/results/speed-<device>.json.
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
from pyro_vae.inference.objectives import KLWeight, kl_weighted, make_elbo

HIDDEN, LATENT, BATCH, K_EVAL, VAMP_K = 300, 40, 100, 1000, 50


def config(prior="normal", device="cpu"):
    return pyro_vae.Config(dataset="binarized-mnist", latent_dim=LATENT, hidden_dim=HIDDEN, hidden_layers=2,
                           batch_size=BATCH, prior=prior, device=device)


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
        return torch.distributions.Normal(h[..., :LATENT], 1e-4 + softplus(h[..., LATENT:]))

    def log_prior(self, z):
        if self.vamp is None:
            return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
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
        for p in plain.parameters():  # as ClippedAdam: clip each parameter's gradient norm
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_(p, 10.0)
        optim.step()


@torch.no_grad()
def plain_iw(plain, x):
    out = []
    for i in range(0, len(x), 25):
        w = plain.log_weights(x[i : i + 25], K_EVAL)
        out.append(torch.logsumexp(w, 0) - math.log(K_EVAL))
    return torch.cat(out)


# --------------------------------------------------------------------------- the pyro-vae side


def pyro_svi(vae, jit=False):
    pyro.clear_param_store()
    weight = KLWeight(1.0)
    return pyro.infer.SVI(kl_weighted(vae.model, weight), kl_weighted(vae.guide, weight),
                          pyro.optim.ClippedAdam({"lr": 1e-3, "clip_norm": 10.0}), make_elbo("trace", jit=jit))


def pyro_epoch(svi, x):
    perm = torch.randperm(len(x), device=x.device)
    for i in range(0, len(x), BATCH):
        svi.step(x[perm[i : i + BATCH]])


def workloads(data, device, args):
    train_x = data.train[: args.train_images].to(device)
    test_x = data.test[: args.eval_images].to(device)
    out = {}
    for name, prior, jit in (("train", "normal", False), ("train-jit", "normal", True), ("vamp", "vamp", False)):
        torch.manual_seed(0)
        vae = pyro_vae.build_vae(config(prior, device.type), data.dim, data.image_shape, data.binary).to(device)
        twin = pyro_vae.build_vae(config(prior, device.type), data.dim, data.image_shape, data.binary).to(device)
        twin.load_state_dict(vae.state_dict())
        plain = PlainVAE(twin)
        optim = torch.optim.Adam(plain.parameters(), lr=1e-3)
        svi = pyro_svi(vae, jit)
        out[name] = (lambda svi=svi: pyro_epoch(svi, train_x), lambda p=plain, o=optim: plain_epoch(p, o, train_x))
    torch.manual_seed(0)
    vae = pyro_vae.build_vae(config("normal", device.type), data.dim, data.image_shape, data.binary).to(device).eval()
    plain = PlainVAE(vae)
    out["eval"] = (lambda: iw_log_likelihood(vae, test_x, K_EVAL, batch_size=25), lambda: plain_iw(plain, test_x))
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
                                    "--memory-of", f"{name}:{side}"], capture_output=True, text=True, check=True)
            mem = json.loads(child.stdout.strip().splitlines()[-1])
            results[name][f"memory_{side}"] = mem
            print(f"{name:6s} {side:6s} workload peak {mem['workload_peak_mib']:.0f} MiB above "
                  f"{mem['baseline_rss_mib']:.0f} MiB loaded"
                  + (f", GPU peak {mem['gpu_peak_mib']:.0f} MiB" if mem["gpu_peak_mib"] else ""), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--memory-only", action="store_true", help="re-measure memory into the last results file")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child mode: run one workload, print max RSS
    args = parser.parse_args()
    device = torch.device(args.device)
    data = pyro_vae.load_dataset("binarized-mnist", args.data_root)
    jobs = workloads(data, device, args)

    if args.memory_of:
        name, side = args.memory_of.split(":")
        pyro.clear_param_store()
        gc.collect()
        before = _rss_mib()
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
        gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
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
    for name, (pyro_fn, plain_fn) in jobs.items():
        # Pyro's param store is global: let this workload's module register its own parameters
        pyro.clear_param_store()
        pyro_fn(), plain_fn()  # warm-up
        times = {"pyro-vae": [], "plain": []}
        for _ in range(args.repeats):
            for side, fn in (("pyro-vae", pyro_fn), ("plain", plain_fn)):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[side].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"median_seconds": med, "ratio": med["pyro-vae"] / med["plain"], "all_seconds": times}
        print(f"{name:6s} pyro-vae {med['pyro-vae']:.3f} s   plain {med['plain']:.3f} s   "
              f"ratio {results[name]['ratio']:.3f}", flush=True)
    _measure_memory(args, jobs, results)
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    record = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": machine,
              "torch": torch.__version__, "pyro": pyro.__version__, "repeats": args.repeats,
              "train_images": args.train_images, "eval_images": args.eval_images, "results": results}
    out = RESULTS(args.device)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

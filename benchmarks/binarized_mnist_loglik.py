"""Test log-likelihood of the standard-normal VAE on static binarized MNIST, next to published figures.

    .venv/bin/python benchmarks/binarized_mnist_loglik.py --data-root ../shared/data/binarized_mnist \
        [--epochs 100] [--k 1000] [--out runs/bench-bmnist]

Trains (or, with an existing --out run, only evaluates) a one-stochastic-layer MLP VAE:
784 -> 300 -> 300 -> z (40, N(0, I) prior, diagonal Normal guide) -> 300 -> 300 -> 784 (Bernoulli),
Softplus activations, Adam lr 1e-3, batch 100, the one-particle ELBO (compiled: JitTrace_ELBO), early stopping on the
validation ELBO (patience 20). Then log p(x) by importance sampling with K samples from the guide on
all 10,000 test images, with its standard error. Results go to benchmarks/results/ as JSON.

Published, same setting (one stochastic layer, MLP, N(0, I) prior, static binarization):
  Burda et al. 2016 (IWAE paper), VAE, k=1 training, 3,280 epochs:    -86.76 nats (K = 5000 evaluation)
  Tomczak & Welling 2018 (VampPrior paper), VAE standard prior:        -88.56 nats (K = 5000 evaluation)
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import pyro_vae
from pyro_vae.inference.metrics import iw_log_likelihood, mean_and_stderr
from pyro_vae.seeding import seeded

PUBLISHED = {"Burda et al. 2016, VAE (k=1)": -86.76, "Tomczak & Welling 2018, VAE standard prior": -88.56}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--out", default="runs/bench-bmnist")
    args = parser.parse_args()

    out = Path(args.out)
    config = pyro_vae.Config(dataset="binarized-mnist", data_root=args.data_root, latent_dim=40, hidden_dim=300,
                             hidden_layers=2, batch_size=100, lr=1e-3, epochs=args.epochs, patience=20)
    started = time.perf_counter()
    if (out / "model.pt").is_file():
        run = pyro_vae.load_run(out)
    else:
        run = pyro_vae.train(config, out)
    train_seconds = time.perf_counter() - started
    x, _ = run.split("test")
    started = time.perf_counter()
    with seeded(0, x.device):
        loglik = iw_log_likelihood(run.vae, x, num_particles=args.k, batch_size=max(1, 20_000_000 // (args.k * 784)))
    eval_seconds = time.perf_counter() - started
    mean, stderr = mean_and_stderr(loglik)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "config": run.config.to_dict(),
        "epochs_trained": len(run.history),
        "best_epoch": run.info.get("best_epoch"),
        "train_seconds": train_seconds,
        "test_elbo": run.info.get("test_elbo"),
        "test_log_likelihood": mean,
        "test_log_likelihood_stderr": stderr,
        "k": args.k,
        "eval_seconds": eval_seconds,
        "published": PUBLISHED,
    }
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "binarized_mnist_loglik.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"epochs trained: {result['epochs_trained']} (best {result['best_epoch']}), {train_seconds / 60:.1f} min")
    print(f"test ELBO:                 {result['test_elbo']:.2f} nats")
    print(f"test log p(x), K={args.k}:  {mean:.2f} +- {stderr:.2f} nats   ({eval_seconds:.0f} s)")
    for name, value in PUBLISHED.items():
        print(f"  published: {name}: {value:.2f}")


if __name__ == "__main__":
    main()

"""Why N(0, I)? A small study on the digits, end to end, in a few minutes on 2 cores.

1. The same VAE (2-D latent) under four priors: what changes in log p(x), in the prior holes,
   and in what z ~ p(z) decodes to.
2. A beta sweep: beta = 0 is a plain autoencoder (no KL pull), beta = 1 the VAE.

Run:  .venv/bin/python examples/why_gaussian.py [--out studies/why-gaussian] [--epochs 60]
Then open <out>/priors/report.html and <out>/beta/report.html.
"""

import argparse
import dataclasses
from pathlib import Path

import pyro_vae
from pyro_vae.study import beta_settings, compare_settings, run_study


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="studies/why-gaussian")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--k", type=int, default=500, help="importance samples for log p(x)")
    args = parser.parse_args()
    out = Path(args.out)
    base = dataclasses.replace(pyro_vae.Config(), epochs=args.epochs)

    priors = run_study("compare", compare_settings(base, ["normal", "laplace", "mog", "flow"], [2], seeds=1),
                       out / "priors", k=args.k)
    betas = run_study("sweep-beta", beta_settings(base, [0.0, 0.1, 1.0, 4.0], [2], seeds=1), out / "beta", k=args.k)
    print(f"reports: {priors}, {betas}")
    print((out / "beta" / "report.md").read_text().split("## What the sweep measured")[1])


if __name__ == "__main__":
    main()

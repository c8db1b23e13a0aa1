"""A prior pyro-vae does not ship, trained on the digits: a learned Student-t whose degrees of
freedom (how heavy its tails are) are learned together with the VAE.

    p(z) = prod_i StudentT(z_i; nu, 0, s_i),   nu = 1 + softplus(a),  s_i = exp(b_i)

Run:  .venv/bin/python examples/custom_prior.py [--epochs 40]
"""

import argparse

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

import pyro_vae


class LearnedStudentT(nn.Module):
    """A prior is any module that returns a distribution with event shape (latent_dim,)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.raw_df = nn.Parameter(torch.tensor(2.0))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self):
        df = 1 + softplus(self.raw_df)
        return dist.StudentT(df, torch.zeros_like(self.log_scale), self.log_scale.exp()).to_event(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="runs/custom-prior")
    args = parser.parse_args()

    config = pyro_vae.Config(latent_dim=2, epochs=args.epochs)
    # A class defined in an importable module is recorded as "module:Class" in config.json;
    # here (__main__) it is recorded as "<object>" and must be passed again to load_run.
    run = pyro_vae.train(config, args.out, prior=LearnedStudentT(config.latent_dim))
    prior = run.vae.prior
    print(f"learned degrees of freedom: {1 + softplus(prior.raw_df).item():.2f}, "
          f"scales: {prior.log_scale.exp().tolist()}")
    print(f"test ELBO: {run.info['test_elbo']:.2f} nats; figures in {run.figures}")


if __name__ == "__main__":
    main()

"""How many of the learned mixture's K = 500 components the trained mixture-of-Gaussians run uses.

    .venv/bin/python studies/binarized-mnist-priors/mixture_usage.py --data-root ../shared/data/binarized_mnist

For every test image x, a code z ~ q(z | x) and its responsibilities r_k(z) = w_k N(z; mu_k, s_k) / p(z)
(``DiagonalNormalMixture.component_log_prob``, softmax over k). Printed: the mixture weights' effective number
exp(H(w)) and how many exceed 1e-3; the effective number of the responsibilities averaged over the test set,
exp(H(mean_x r(z))); how many components are the most responsible one for some test image.
"""

import argparse
from pathlib import Path

import torch

import pyro_vae


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--run", default=str(Path(__file__).parent / "runs" / "mog-z40-s0"))
    args = parser.parse_args()
    vae = pyro_vae.load_run(args.run).vae
    test = pyro_vae.load_dataset("binarized-mnist", args.data_root).test
    prior = vae.prior()
    k = prior.num_components
    torch.manual_seed(0)
    mean_r, top = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            r = torch.softmax(prior.component_log_prob(vae.guide_dist(test[i : i + 1000]).rsample()), -1).double()
            mean_r += r.sum(0)
            top += torch.bincount(r.argmax(-1), minlength=k)
    mean_r /= len(test)
    w = torch.softmax(prior.logits.detach(), -1).double()

    def effective(p):
        p = p[p > 0]
        return torch.exp(-(p * p.log()).sum()).item()

    print(f"{Path(args.run).name}: K = {k} components, {len(test)} test images")
    print(f"mixture weights: effective number {effective(w):.2f}, {(w > 1e-3).sum().item()} above 1e-3, "
          f"largest {w.max().item():.4f}")
    print(f"responsibilities averaged over the test codes: effective number {effective(mean_r):.2f}")
    print(f"components most responsible for some test image: {(top > 0).sum().item()}")


if __name__ == "__main__":
    main()

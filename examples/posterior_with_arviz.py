"""How far is the amortized guide q(z|x) from the exact posterior p(z|x)? Guide draws beside NUTS
draws, in ArviZ, and the gap log p(x) - ELBO split into its two parts (Cremer et al. 2018):

    approximation gap = log p(x) - ELBO(best q of the guide's family for this x)
    amortization gap  = ELBO(best q for this x) - ELBO(the encoder's q)

Trains a small VAE on the 8x8 digits (about a minute on 2 cores), or takes a run directory, then
analyses a few test images: writes idata.nc (reload it with arviz.from_netcdf), summary.csv,
gaps.json and figures/ to RUN/analysis.

Run:  .venv/bin/python examples/posterior_with_arviz.py [RUN] [--obs 4] [--epochs 30]
"""

import argparse
from pathlib import Path

import pyro_vae
from pyro_vae.inference.analysis import analyze_run, load_inference_data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, help="a run directory (default: train one)")
    parser.add_argument("--obs", type=int, default=4, help="how many test images to analyse")
    parser.add_argument("--epochs", type=int, default=30, help="epochs, when training")
    parser.add_argument("--out", type=Path, default=Path("runs/arviz-example"), help="run directory to train into")
    args = parser.parse_args()

    run_path = args.run
    if run_path is None:
        config = pyro_vae.Config(latent_dim=2, hidden_dim=128, epochs=args.epochs, patience=0)
        run_path = pyro_vae.train(config, args.out).path

    analysis, paths = analyze_run(run_path, obs=args.obs, num_chains=4, num_draws=500, warmup=500)
    print(analysis.report())

    # The InferenceData is ordinary ArviZ: select a method and a data point by name.
    idata = load_inference_data(paths["idata"])
    z = idata.posterior["z"]
    first = z["obs"].values[0]
    print(f"\nposterior of data point {first}, mean per method:")
    print(z.sel(obs=first).mean(("chain", "draw")).to_pandas().round(3))
    gaps = analysis.gaps["mean"]
    print(f"\nmean over the {args.obs} images: gap {gaps['gap']:.3f} nats = approximation "
          f"{gaps['approximation_gap']:.3f} + amortization {gaps['amortization_gap']:.3f}")
    print(f"files: {paths['idata'].parent}/")


if __name__ == "__main__":
    main()

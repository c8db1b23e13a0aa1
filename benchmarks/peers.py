"""Speed against a peer: pythae's trainer and pyro-vae on the same network and data, in one process.

pythae 0.1.2 pins old versions of little but installs beside torch 2.14.1; it lives in its own
environment, with pyro-vae installed there too so both run in one process:

    python3 -m venv benchmarks/.venv-peers
    benchmarks/.venv-peers/bin/pip install pythae==0.1.2 -e .
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --data-root ../shared/data/binarized_mnist [--rounds 5]

The model: static binarized MNIST (--train-images training images, --valid-images validation images),
the MLP VAE 784-300-300-40 with softplus units, a one-sample ELBO with a Bernoulli likelihood, batch
100, Adam at lr 1e-3. pythae's own parts: its ``VAE`` (log-variance head, sigmoid decoder output with
``reconstruction_loss="bce"``, analytic KL) trained by its ``BaseTrainer`` (its data loader, train and
eval steps, best-model copy, logging); pyro-vae's: ``pyro_vae.train`` (the direct ELBO, validation ELBO,
checkpoint and history each epoch), as a short run trains (uncompiled) and as a run of 30,000 steps or more
does (``pyro-vae-compiled``: the ELBO compiled with torch.compile); and, for reference, benchmarks/speed.py's plain-PyTorch twin (steps
and validation ELBO). Each round trains each for --epochs epochs, alternating the order; every epoch is timed from one ``on_epoch_end`` callback to the next, the first of each training
(set-up, compilation) dropped. Printed: median seconds per epoch (training + validation) and the median
of pyro-vae / pythae over the rounds' paired medians.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import pyro_vae
from pyro_vae.data import Dataset

HIDDEN, LATENT, BATCH, LR = 300, 40, 100, 1e-3


def mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, HIDDEN), nn.Softplus(),
                         nn.Linear(HIDDEN, outputs))


def pythae_epochs(train_x, valid_x, epochs: int) -> list[float]:
    """Seconds per epoch of pythae's BaseTrainer (first epoch dropped)."""
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = mlp(784, 2 * LATENT)

        def forward(self, x):
            h = self.net(x.reshape(len(x), -1))
            return ModelOutput(embedding=h[:, :LATENT], log_covariance=h[:, LATENT:])

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = mlp(LATENT, 784)

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    marks = []

    class Timer(TrainingCallback):
        def on_epoch_end(self, training_config, **kwargs):
            marks.append(time.perf_counter())

    model = VAE(VAEConfig(input_dim=(784,), latent_dim=LATENT, reconstruction_loss="bce"), encoder=Encoder(),
                decoder=Decoder())
    with tempfile.TemporaryDirectory() as tmp:
        config = BaseTrainerConfig(output_dir=tmp, num_epochs=epochs, learning_rate=LR,
                                   per_device_train_batch_size=BATCH, per_device_eval_batch_size=1000,
                                   optimizer_cls="Adam", no_cuda=True)
        trainer = BaseTrainer(model, BaseDataset(train_x, torch.zeros(len(train_x))),
                              BaseDataset(valid_x, torch.zeros(len(valid_x))), training_config=config,
                              callbacks=[Timer()])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.train()  # its progress bars and banners, kept off this benchmark's output
    return [b - a for a, b in zip(marks, marks[1:])]


def pyro_vae_epochs(data: Dataset, epochs: int, compiled: bool = False) -> list[float]:
    """Seconds per epoch of pyro_vae.train (first epoch dropped). ``compiled``: as a run of
    COMPILE_MIN_STEPS steps or more trains (the direct ELBO compiled with torch.compile); else as a short
    run does (uncompiled)."""
    from pyro_vae.inference import step

    marks = []
    config = pyro_vae.Config(dataset="binarized-mnist", latent_dim=LATENT, hidden_dim=HIDDEN, hidden_layers=2,
                             batch_size=BATCH, lr=LR, epochs=epochs, patience=0)
    threshold, step.COMPILE_MIN_STEPS = step.COMPILE_MIN_STEPS, 0 if compiled else float("inf")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = pyro_vae.train(config, Path(tmp) / "run", data=data, progress=False,
                                 on_epoch_end=lambda epoch, record: marks.append(time.perf_counter()))
    finally:
        step.COMPILE_MIN_STEPS = threshold
    assert run.info["compiled"] == compiled, run.info
    return [b - a for a, b in zip(marks, marks[1:])]


def twin_epochs(data: Dataset, epochs: int) -> list[float]:
    """Seconds per epoch of the plain-PyTorch twin of benchmarks/speed.py (steps + validation ELBO)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import Twin, config, epochs_of, twin_elbo, twin_optimizer, twin_step

    torch.manual_seed(0)
    twin = Twin(pyro_vae.build_vae(config(), data.dim, data.image_shape, data.binary), "normal")
    optim = twin_optimizer(twin.parameters(), LR)
    epoch = epochs_of(lambda xb: twin_step(twin, optim, xb), data.train)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        epoch()
        twin_elbo(twin, data.valid)
        times.append(time.perf_counter() - started)
    return times[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training (the first is dropped)")
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--valid-images", type=int, default=10_000)
    args = parser.parse_args()
    logging.getLogger("pythae").setLevel(logging.WARNING)
    full = pyro_vae.load_dataset("binarized-mnist", args.data_root)
    data = Dataset("binarized-mnist", full.train[: args.train_images], full.valid[: args.valid_images],
                   full.test[: args.valid_images], full.image_shape, full.binary)
    times = {"pyro-vae": [], "pyro-vae-compiled": [], "pythae": [], "twin": []}
    for r in range(args.rounds):
        sides = [("pyro-vae", lambda: pyro_vae_epochs(data, args.epochs)),
                 ("pyro-vae-compiled", lambda: pyro_vae_epochs(data, args.epochs, compiled=True)),
                 ("pythae", lambda: pythae_epochs(data.train, data.valid, args.epochs)),
                 ("twin", lambda: twin_epochs(data, args.epochs))]
        for side, run in sides if r % 2 == 0 else sides[::-1]:
            torch.manual_seed(r)
            times[side].append(statistics.median(run()))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s/epoch" for k, v in times.items()), flush=True)

    def paired(a, b):
        ratios = sorted(x / y for x, y in zip(times[a], times[b]))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return {"ratio": statistics.median(ratios), "quartiles": [q1, q3]}

    ratios = {f"{a} / {b}": paired(a, b) for a, b in (("pyro-vae", "pythae"), ("pyro-vae-compiled", "pythae"),
                                                       ("pyro-vae", "twin"))}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "train_images": args.train_images, "valid_images": args.valid_images,
              "epochs_per_training": args.epochs, "rounds": args.rounds,
              "median_seconds_per_epoch": {k: statistics.median(v) for k, v in times.items()},
              "ratios": ratios, "all_seconds": times,
              "command": "benchmarks/peers.py " + " ".join(__import__("sys").argv[1:])}
    for name, r in ratios.items():
        print(f"{name}: {r['ratio']:.3f} (quartiles {r['quartiles'][0]:.3f}-{r['quartiles'][1]:.3f})")
    out = Path(__file__).parent / "results" / "peers-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

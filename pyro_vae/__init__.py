"""pyro-vae: why is the VAE prior N(0, I), and what happens with another one?"""

from .config import Config
from .data import Dataset, from_tensor, load_dataset
from .errors import PyroVAEError, TrainingDiverged
from .inference import elbo_per_datapoint, evaluate_elbo, iw_log_likelihood, resume, train
from .models import VAE, Prior, build_prior, build_vae
from .run_dir import Run, load_run
from .version import __version__

__all__ = ["Config", "Dataset", "load_dataset", "from_tensor", "VAE", "Prior", "build_vae", "build_prior", "train",
           "resume", "load_run", "Run", "evaluate_elbo", "elbo_per_datapoint", "iw_log_likelihood",
           "PyroVAEError", "TrainingDiverged", "__version__"]

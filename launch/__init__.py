"""Launchers for multi-process and multi-host runs (JAX distributed runtime):
`local.py` starts N processes on one machine, `slurm.sbatch` is a SLURM
template. See README, "Running on several hosts"."""

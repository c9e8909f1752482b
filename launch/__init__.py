"""Launching `python -m train` on clusters: SLURM sbatch scripts, `python -m launch.submit`, torchrun (launch/*.sh)."""

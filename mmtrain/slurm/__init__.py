"""SLURM: sbatch scripts rendered from a recipe, submission with dependencies and arrays, job status."""

"""Hyperparameter sweeps: the search space, the Optuna study, a trial's score and Pareto front, trial pruning."""

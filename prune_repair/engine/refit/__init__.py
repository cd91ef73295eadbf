"""Least-squares refits of a layer's remaining weights: Gram statistics, ridge and CG solves, reconstruction."""

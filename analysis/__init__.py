"""Mammals Space analysis library: maps, clusters, neighbours, sparsity statistics, latent operations, exports.

Everything here reads a store (see ``indexer.store``) and returns tidy tables; the dashboard and the CLI only
call these functions.
"""

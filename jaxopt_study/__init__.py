"""jaxopt_study: how optimizers behave under sparse, non-stationary transformer gradients."""

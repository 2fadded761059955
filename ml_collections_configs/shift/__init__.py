"""Distribution-shift configs: train on a source domain, adapt to or evaluate on shifted
targets (jax_transfer/data/domains.py's embedded domains, or catalogue datasets)."""

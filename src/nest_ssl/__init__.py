"""nest: a standalone port of NeMo's NEST speech model (EncDecDenoiseMaskedTokenPredModel)."""

"""nest-align: capture, compare and report numerical alignment between two training frameworks.

Nothing in this package imports NeMo or the nest port: it works on any torch.nn.Module or
LightningModule and on the artifact files it writes (docs/artifacts.md).
"""

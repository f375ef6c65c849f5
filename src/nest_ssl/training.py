"""NEST pretraining as a LightningModule: data loaders, steps, logging and optimizers like NeMo's.

``NestPretraining(cfg, trainer)`` takes the ``model:`` config section. It is ``NestModel`` with
``LightningModule`` mixed in after it, so the modules, the state_dict and the random draws at
construction are the model's own (no wrapper, no key prefix). As in NeMo, the data loaders
are built before the modules (which consumes no random numbers); the optimizer and the schedule are
built when Lightning asks for them. Logged keys: ``learning_rate``, ``global_step`` and
``train_loss`` per step, ``val_loss`` per validation run.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from nest_ssl.augmentation import MultiSpeakerNoiseAugmentation
from nest_ssl.batch import AudioNoiseBatch
from nest_ssl.config import validate_model_config
from nest_ssl.dataset import AudioNoiseDataset
from nest_ssl.model import NestModel
from nest_ssl.optim import build_optimizer, build_scheduler, compute_max_steps

log = logging.getLogger(__name__)


def build_dataloader(ds: dict[str, Any], model_rate: int) -> DataLoader:
    """A DataLoader over an AudioNoiseDataset, with the arguments NeMo gives it."""
    rate = ds.get("sample_rate")
    if rate is None:
        rate = model_rate
    elif rate != model_rate:
        log.warning("dataset sample_rate %s differs from the model's %s", rate, model_rate)
    augmentor_cfg = ds.get("batch_augmentor")
    dataset = AudioNoiseDataset(
        manifest_filepath=ds["manifest_filepath"],
        sample_rate=rate,
        noise_manifest=ds.get("noise_manifest"),
        batch_augmentor=None
        if augmentor_cfg is None
        else MultiSpeakerNoiseAugmentation.from_config(augmentor_cfg),
        min_duration=ds.get("min_duration"),
        max_duration=ds.get("max_duration"),
    )
    return DataLoader(
        dataset=dataset,
        batch_size=ds["batch_size"],
        collate_fn=dataset.collate_fn,
        drop_last=ds.get("drop_last", False),
        shuffle=ds.get("shuffle", False),
        num_workers=ds.get("num_workers", 0),
        pin_memory=ds.get("pin_memory", False),
    )


class NestPretraining(NestModel, pl.LightningModule):
    """NestModel with NeMo's training loop pieces (see the module docstring)."""

    def __init__(self, cfg: DictConfig, trainer: Any = None):
        model = validate_model_config(cfg)
        loaders = {
            key: build_dataloader(model[key], model["sample_rate"])
            for key in ("train_ds", "validation_ds")
            if model.get(key) is not None
        }
        super().__init__(cfg)
        self.model_config = model
        self._train_dl: DataLoader | None = loaders.get("train_ds")
        self._validation_dl: DataLoader | None = loaders.get("validation_ds")
        self._optimizer: torch.optim.Optimizer | None = None
        self.validation_step_outputs: list[dict[str, torch.Tensor]] = []

    def train_dataloader(self) -> DataLoader | None:
        return self._train_dl

    def val_dataloader(self) -> DataLoader | list:
        return [] if self._validation_dl is None else self._validation_dl

    def _step(self, batch: AudioNoiseBatch) -> torch.Tensor:
        log_probs, encoded_len, masks, tokens = self.forward(
            input_signal=batch.audio,
            input_signal_length=batch.audio_len,
            noise_signal=batch.noise,
            noise_signal_length=batch.noise_len,
            noisy_input_signal=batch.noisy_audio,
            noisy_input_signal_length=batch.noisy_audio_len,
            apply_mask=True,
        )
        return self.loss(
            masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len
        )

    def training_step(self, batch: AudioNoiseBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        loss = self._step(batch)
        logs = {
            "learning_rate": self._optimizer.param_groups[0]["lr"],
            "global_step": self.trainer.global_step,
            "train_loss": loss,
        }
        self.log_dict(logs, on_step=True)
        return {"loss": loss}

    def validation_step(
        self, batch: AudioNoiseBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        metrics = {"val_loss": self._step(batch)}
        self.validation_step_outputs.append(metrics)
        return metrics

    def on_validation_epoch_end(self) -> None:
        if not self.validation_step_outputs:
            return
        mean = torch.stack([x["val_loss"] for x in self.validation_step_outputs]).mean()
        self.log_dict({"val_loss": mean}, on_epoch=True, sync_dist=False)
        self.validation_step_outputs.clear()

    def _max_steps(self) -> int | None:
        """The run length the schedule is told (NeMo's rule); None when it cannot be known."""
        trainer = self.trainer
        if trainer.max_steps >= 0:
            return trainer.max_steps
        if self._train_dl is None or trainer.max_epochs is None:
            return None
        return compute_max_steps(
            max_epochs=trainer.max_epochs,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            limit_train_batches=trainer.limit_train_batches,
            num_workers=trainer.num_devices * trainer.num_nodes,
            num_samples=len(self._train_dl.dataset),
            batch_size=self._train_dl.batch_size,
            drop_last=self._train_dl.drop_last,
        )

    def configure_optimizers(self) -> Any:
        optim_cfg = self.model_config.get("optim")
        if optim_cfg is None:
            return None
        self._optimizer = build_optimizer(list(self.parameters()), optim_cfg)
        sched_cfg = optim_cfg.get("sched")
        if sched_cfg is not None and self.trainer.max_steps >= 0:
            sched_cfg = {**sched_cfg, "max_steps": self.trainer.max_steps}
        scheduler = build_scheduler(self._optimizer, sched_cfg, self._max_steps())
        if scheduler is None:
            return self._optimizer
        return [self._optimizer], [scheduler]

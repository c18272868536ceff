"""The training job: a metric-learning run from a :class:`~model.training_config.TrainingConfig`
to checkpoints.

One code path serves a laptop, one GPU and ``torchrun`` (DistributedDataParallel when
``WORLD_SIZE`` > 1; only rank 0 writes).  With ``frozen_backbone`` the backbone's feature maps
are cached once and only the pooling (and loss) train, on the cache.  A run writes a
checkpoint directory (``epoch-NNN``, every ``checkpoint_every`` epochs and after the last) with
the trainer state beside the weights (safetensors + JSON, never pickle) for ``resume``, the
validation metrics and the ``metrics.png`` plot; every epoch adds a line to ``metrics.jsonl``.
The checkpointed epoch with the best MAP@R on the validation split (``data.val``, carved from
training data) is copied to ``best``; after training, ``best`` is scored once on ``data.test``
(``test_metrics.json``).

Modules: ``loop`` (the epochs), ``distributed`` (process group, seeding), ``inputs`` (training
batches, validation and test inputs), ``feature_maps`` (the frozen backbone's cached maps), ``step``
(forward and objective), ``optim`` (optimiser, schedule), ``checkpoints`` (the run directory),
``state`` (the trainer state without pickle), ``metrics_log`` (JSONL and plot).
"""

from model.training.inputs import cache_features
from model.training.loop import TrainResult, train

__all__ = ["TrainResult", "cache_features", "train"]

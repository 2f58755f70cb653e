"""``CMIRegularizer``: the CMI term of Min-CMI / Max-CMI fine-tuning as an ``nn.Module`` with centroid state.

With ``f_i = softmax(x_i / T)`` of the (optionally normalised) features ``x_i`` and class centroids ``g_c``:

    CMI = mean_i KL(f_i || g_{y_i})

The module returns this non-negative term; the caller adds it with its sign and weight
(Min-CMI: ``ce + lam * reg(h, y)``, Max-CMI: ``ce - lam * reg(h, y)``), as the GLUE driver does.

Centroid modes (``g_c`` is always held constant for the gradient):

* ``batch``: ``g_c`` = class mean of ``f`` over the current batch (exact per-batch CMI).
* ``epoch``: the paper's alternating algorithm. ``g_c`` for epoch ``e`` = class mean of ``f`` over epoch
  ``e - 1``, accumulated from the op's ``class_sums`` / ``class_counts`` while training (no extra pass);
  during the first epoch, per-batch centroids. Call :meth:`end_epoch` at every epoch end.
* ``ema``: ``g_c <- momentum * g_c + (1 - momentum) * (batch class mean)`` after every training batch,
  for the classes in the batch; the loss uses the average of the batches before.
* ``frozen``: class means of one pass over the training set (:meth:`freeze`), then fixed.

Until every class in a batch has a centroid (first epoch, first batches, a class not seen yet), that
batch uses per-batch centroids.

``normalization="center_l2"``: ``x_i = (h_i - mu) / ||h_i - mu||`` with ``mu`` a running mean of the
features (``mu <- feature_momentum * mu + (1 - feature_momentum) * batch mean``, updated in training mode
before it is used, held fixed in ``frozen`` mode). Unit-norm features need a small temperature (e.g. 0.1)
for ``f`` to be far from uniform.

Under ``torch.distributed`` the class sums and counts (and the feature sums of ``center_l2``) are
all-reduced before every state update, so every rank holds the centroids that one process would compute
on the union of the data. ``batch`` mode centroids are those of each rank's own batch. The ``epoch`` mode's sums of
the epoch in progress are each rank's own until :meth:`end_epoch` reduces them (one all-reduce per epoch, not per
step): a checkpoint taken mid-epoch under torch.distributed needs every rank's state, or take it at an epoch end
(``cmi-glue`` saves at epoch ends). Keep the module outside a ``DistributedDataParallel``-wrapped model (as
``cmi-glue`` does) or wrap with ``broadcast_buffers=False``: DDP's default broadcast of rank 0's buffers at every
forward would overwrite the other ranks' epoch sums.

All state lives in buffers, so ``state_dict`` / checkpoints carry it; the settings that give it its meaning
(centroid mode, temperature, normalisation, and the momenta where the mode uses them) travel with it as extra
state, and loading a state saved under other settings raises, leaving the regulariser as it was. The float buffers
stay float32 when the module (or a model holding it) is cast to another dtype, or loaded with ``assign=True`` from a
state in another dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .distributed import all_reduce_sum
from .loss import cmi_loss
from .options import (
    check_backend,
    check_eps,
    check_float_tensor,
    check_int,
    check_label_tensor,
    check_number,
    check_temperature,
    compute_dtype,
    labels_in_range,
    maybe_validate_labels,
)

CENTROID_MODES = ("batch", "epoch", "ema", "frozen")
NORMALIZATIONS = ("none", "center_l2")


def copy_centroids(centroids: torch.Tensor) -> torch.Tensor:
    """``centroids.clone()``, which a compiled graph saves for its backward.

    torch.compile's partitioner recomputes a cheap op such as ``clone`` in the backward rather than save its result,
    and so reads the buffer after the forward's in-place ema update: a silently wrong gradient
    (pytorch/pytorch#197039, open). The partitioner recomputes only ops it knows, so it saves a custom op's result.
    Eager calls skip the op dispatcher, as the kernels' launchers do (a call through it: 9.6 us against 1.4 for a
    clone of 3 x 768 on the dev CPU).
    """
    return copy_centroids_op(centroids) if torch.compiler.is_compiling() else centroids.clone()


@torch.library.custom_op("cmi_fused::copy_centroids", mutates_args=())
def copy_centroids_op(centroids: torch.Tensor) -> torch.Tensor:
    return centroids.clone()


@copy_centroids_op.register_fake
def _(centroids: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(centroids)


class CMIRegularizer(nn.Module):
    """The CMI term ``mean_i KL(softmax(x_i / T) || g_{y_i})`` with ``batch``/``epoch``/``ema``/``frozen`` centroids.

    Args:
        num_classes: C.
        dim: d, the feature width.
        centroids: one of ``batch``, ``epoch``, ``ema``, ``frozen`` (see the module docstring).
        temperature: T > 0 of the softmax.
        normalization: ``none`` or ``center_l2``.
        momentum: EMA momentum of the ``ema`` centroids, in [0, 1).
        feature_momentum: momentum of the running feature mean of ``center_l2``, in [0, 1).
        eps: floor of the centroids before the log.
        backend: ``cmi_loss`` backend (``auto``: Triton on CUDA where it is installed, PyTorch otherwise).

    Call ``reg(features, labels)`` with (N, d) features and (N,) labels; returns the scalar CMI term.
    State is updated only in training mode (``reg.train()``, the default).
    """

    # A module pickled whole (torch.save(reg)) before this host flag existed unpickles without it: "maybe", which asks
    # the device as before.
    _any_class_valid = True

    def __init__(
        self,
        num_classes: int,
        dim: int,
        centroids: str = "batch",
        *,
        temperature: float = 1.0,
        normalization: str = "none",
        momentum: float = 0.9,
        feature_momentum: float = 0.99,
        eps: float = 1e-12,
        backend: str = "auto",
    ):
        super().__init__()
        num_classes = check_int("num_classes", num_classes)
        dim = check_int("dim", dim)
        if centroids not in CENTROID_MODES:
            raise ValueError(f"centroids must be one of {CENTROID_MODES}, got {centroids!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        check_backend(backend)
        self.num_classes = num_classes
        self.dim = dim
        self.mode = centroids
        self.temperature = check_temperature(temperature)
        self.normalization = normalization
        self.momentum = check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        self.feature_momentum = check_number("feature_momentum", feature_momentum, 0.0, 1.0, high_open=True)
        self.eps = check_eps(eps)
        self.backend = backend
        # g_c in use, and which classes have one (the rest fall back to per-batch centroids).
        self.register_buffer("centroids", torch.zeros(num_classes, dim))
        self.register_buffer("centroid_valid", torch.zeros(num_classes, dtype=torch.bool))
        # epoch mode: sums and counts of f over the current epoch.
        self.register_buffer("epoch_class_sums", torch.zeros(num_classes, dim))
        self.register_buffer("epoch_class_counts", torch.zeros(num_classes))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        # center_l2: running feature mean.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_mean_valid", torch.zeros((), dtype=torch.bool))
        # Host copies of centroid_valid.any(), centroid_valid.all() and feature_mean_valid: no device sync per step.
        self._any_class_valid = False
        self._all_classes_valid = False
        self._feature_mean_ready = False

    def _apply(self, fn, recurse=True):
        """Device moves apply to the state; dtype casts (``model.half()``, ``model.to(torch.bfloat16)``) do not: the
        class sums, counts and centroids stay float32 (in bfloat16 an epoch's class count stops growing at 256)."""

        def keep_dtype(tensor):
            converted = fn(tensor)
            return converted if converted.dtype == tensor.dtype else tensor.to(converted.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, centroids={self.mode!r}, "
            f"temperature={self.temperature}, normalization={self.normalization!r}"
        )

    def _settings(self) -> dict:
        """The settings the state depends on: momentum only in ema mode, feature_momentum only with center_l2."""
        settings = {"centroids": self.mode, "temperature": self.temperature, "normalization": self.normalization}
        if self.mode == "ema":
            settings["momentum"] = self.momentum
        if self.normalization == "center_l2":
            settings["feature_momentum"] = self.feature_momentum
        return settings

    def get_extra_state(self) -> dict:
        return self._settings()

    def set_extra_state(self, state: dict) -> None:
        settings = self._settings()
        # Compared where both sides use a setting: centroids and normalization always differ when only one does.
        differing = {name: value for name, value in state.items() if name in settings and settings[name] != value}
        if differing:
            listed = ", ".join(f"{name}: {value!r} there, {settings[name]!r} here" for name, value in differing.items())
            raise ValueError(f"CMIRegularizer state saved under other settings ({listed})")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        extra_state_key = prefix + "_extra_state"  # nn.Module's key for get_extra_state()
        if extra_state_key in state_dict:
            self.set_extra_state(state_dict[extra_state_key])  # raises before any buffer is overwritten
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if extra_state_key in missing_keys:  # saved before the settings were stored: nothing to check
            missing_keys.remove(extra_state_key)
        for name, buffer in self._buffers.items():  # load_state_dict(assign=True) takes the saved tensors' dtype
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        self._note_valid_classes()
        self._feature_mean_ready = bool(self.feature_mean_valid)

    def _note_valid_classes(self) -> None:
        """The host copies of which classes have a centroid: none, some or all (one device sync)."""
        valid = int(self.centroid_valid.sum())
        self._any_class_valid = valid > 0
        self._all_classes_valid = valid == self.num_classes

    # ----------------------------------------------------------------------------------------------
    def normalize(self, features: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``center_l2``: ``(h - mu) / ||h - mu||``; no state changes.

        ``mu``: ``mean`` if given, else the running feature mean, else (none yet: evaluation before training) this
        batch's mean.
        """
        if self.normalization == "none":
            return features
        features = features.to(compute_dtype(features.dtype))
        if mean is None:
            mean = self.feature_mean if self._feature_mean_ready else features.detach().mean(0)
        return nn.functional.normalize(features - mean, dim=-1)

    def _updated_feature_mean(self, features: torch.Tensor) -> torch.Tensor:
        """The running feature mean after this batch (the rows of every process), not yet stored."""
        detached = features.detach().float()
        count = detached.new_full((), float(detached.shape[0]))  # a fill, not a host-to-device copy
        batch_sum, count = all_reduce_sum(detached.sum(0), count)
        batch_mean = batch_sum / count
        if self._feature_mean_ready:
            batch_mean = self.feature_momentum * self.feature_mean + (1 - self.feature_momentum) * batch_mean
        return batch_mean

    def _set_feature_mean(self, mean: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_mean_valid.fill_(True)
        self._feature_mean_ready = True

    def _centroids_for(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The stored centroids if every class in ``labels`` has one, else ``None`` (per-batch centroids)."""
        if self.mode == "batch":
            return None
        if self._all_classes_valid:
            return self.centroids
        if self.mode == "frozen":
            raise RuntimeError("CMIRegularizer(centroids='frozen'): call reg.freeze(batches) before using it")
        if not self._any_class_valid:  # epoch mode's first epoch: per-batch centroids without asking the device
            return None
        # Labels outside [0, C) go to an overflow bin (cmi_loss reports them); none is counted as a class.
        labels, in_range = labels_in_range(labels, self.num_classes)
        bins = torch.where(in_range, labels, self.num_classes)
        present = torch.bincount(bins, minlength=self.num_classes + 1)[: self.num_classes] > 0
        if bool((present & ~self.centroid_valid).any()):
            return None
        return self.centroids

    def _check_batch(self, features, labels) -> None:
        """``features`` a float (N, dim) tensor and ``labels`` an integer (N,) tensor beside it, checked before they
        touch any state: normalisation's float result would hide integer features from cmi_loss's own check, and a
        wrong width could broadcast into the buffers."""
        check_float_tensor(features)
        if features.dim() != 2 or features.shape[-1] != self.dim:
            raise ValueError(f"features must have shape (N, dim={self.dim}), got {tuple(features.shape)}")
        check_label_tensor(labels, features.shape[0], features.device, "features")

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The CMI term of ``features`` (N, d) with class ``labels`` (N,): a scalar, float32 (float64 for float64
        features on the torch backend)."""
        self._check_batch(features, labels)
        maybe_validate_labels(labels, self.num_classes, None)  # before _centroids_for counts them
        update = self.training and self.mode != "frozen"
        centroids = self._centroids_for(labels)
        if update and self.mode == "ema" and centroids is not None:
            # The ema update below rewrites the buffer in place before the backward, which needs the centroids this
            # forward used (the triton backend saves them): hand the op a copy that torch.compile keeps.
            centroids = copy_centroids(centroids)
        # center_l2 while training: mu moves with this batch first, and normalises it
        feature_mean = self._updated_feature_mean(features) if update and self.normalization == "center_l2" else None
        result = cmi_loss(
            self.normalize(features, feature_mean),
            labels,
            self.num_classes,
            centroids,
            temperature=self.temperature,
            eps=self.eps,
            backend=self.backend,
            check_labels=False,  # checked above
        )
        # Only now, with every check of the op passed, does any state change: a call that raises changes nothing.
        if feature_mean is not None:
            self._set_feature_mean(feature_mean)
        if update:
            self._accumulate(result.class_sums, result.class_counts)
        return result.loss

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _set_centroids(self, class_sums: torch.Tensor, class_counts: torch.Tensor, blend: bool) -> None:
        present = class_counts > 0
        means = class_sums / class_counts.clamp_min(1.0)[:, None]
        if blend:
            blended = self.momentum * self.centroids + (1 - self.momentum) * means
            means = torch.where(self.centroid_valid[:, None], blended, means)
        self.centroids.copy_(torch.where(present[:, None], means, self.centroids))
        self.centroid_valid |= present
        if not self._all_classes_valid:  # a device sync only until every class has a centroid
            self._note_valid_classes()

    @torch.no_grad()
    def _accumulate(self, class_sums: torch.Tensor, class_counts: torch.Tensor) -> None:
        if self.mode == "epoch":
            self.epoch_class_sums += class_sums
            self.epoch_class_counts += class_counts
        elif self.mode == "ema":
            self._set_centroids(*all_reduce_sum(class_sums, class_counts), blend=True)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close an epoch. ``epoch`` mode: the class means of this epoch become the next epoch's centroids."""
        if self.mode == "epoch":
            sums, counts = all_reduce_sum(self.epoch_class_sums.clone(), self.epoch_class_counts.clone())
            self._set_centroids(sums, counts, blend=False)
            self.epoch_class_sums.zero_()
            self.epoch_class_counts.zero_()
        self.epoch += 1

    @torch.no_grad()
    def freeze(self, batches: Iterable) -> None:
        """``frozen`` mode: fix ``g_c`` to the class means of ``f`` over ``batches`` of ``(features, labels)``.

        ``batches`` is one eval-mode pass of the starting model over the training set. With ``center_l2``
        and no running feature mean yet, it is iterated twice (feature mean first), so it must be
        re-iterable (a list or a DataLoader-like object), not an iterator.
        """
        if self.mode != "frozen":
            raise RuntimeError(f"freeze() is for centroids='frozen', this regulariser uses {self.mode!r}")
        feature_mean = None  # a new running feature mean, stored with the centroids once both are known
        if self.normalization == "center_l2" and not self._feature_mean_ready:
            if iter(batches) is batches:
                raise TypeError(
                    "freeze(batches) with center_l2 needs a re-iterable (list, DataLoader), not an iterator"
                )
            feature_sum, count = torch.zeros_like(self.feature_mean), torch.zeros((), device=self.feature_mean.device)
            for features, labels in batches:
                self._check_batch(features, labels)
                feature_sum += features.detach().float().sum(0).to(feature_sum.device)
                count += features.shape[0]
            feature_sum, count = all_reduce_sum(feature_sum, count)
            if not count > 0:
                raise ValueError("freeze(batches) got no rows")
            feature_mean = feature_sum / count
        class_sums = torch.zeros_like(self.centroids)
        class_counts = torch.zeros_like(self.epoch_class_counts)
        for features, labels in batches:
            self._check_batch(features, labels)
            features = features.to(class_sums.device)
            result = cmi_loss(
                self.normalize(features, feature_mean),
                labels.to(class_sums.device),
                self.num_classes,
                temperature=self.temperature,
                eps=self.eps,
                backend=self.backend,
                check_labels=True,  # one pass, not a training step: the range check's sync costs nothing here
            )
            class_sums += result.class_sums
            class_counts += result.class_counts
        class_sums, class_counts = all_reduce_sum(class_sums, class_counts)
        if not bool((class_counts > 0).all()):
            missing = (class_counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"freeze(batches): classes {missing} have no rows; every class needs a centroid")
        if feature_mean is not None:
            self._set_feature_mean(feature_mean)
        self._set_centroids(class_sums, class_counts, blend=False)

"""Dropout Inversion Attack (Scheliga, Maeder, Seeland, "Dropout is NOT All You Need to
Prevent Gradient Leakage", AAAI 2023; code ``DropoutInversionAttack/src/attacks.py``).

The client computed its gradient with dropout active, so an attack that assumes the
expected-value network matches the wrong function. DIA optimises, jointly with the
images, one continuous mask per dropout layer (shape = that layer's input per sample),
initialised from Bernoulli(1 - p), clipped to [0, 1] after each step and applied as
x * mask / (1 - p) (``attacks.objective.substitute_dropout``). Loss:
1 - cos + 1e-5 TV + 1e-4 * sum_layers |(1 - mean(mask)) - p|; Adam lr 0.1 with the
signed image gradient and the box clip of Inverting Gradients.
"""

from __future__ import annotations

import torch

from .base import register
from .inverting_gradients import InvertingGradientsAttack
from .objective import dropout_layers, dropout_shapes
from .observation import Observation


@register("dia")
class DropoutInversionAttack(InvertingGradientsAttack):
    threats = ("gradient",)

    def __init__(self, *, tv: float = 1e-5, mask_weight: float = 1e-4, **kwargs):
        kwargs.pop("dropout_masks", None)
        super().__init__(tv=tv, **kwargs)
        self.mask_weight = float(mask_weight)

    def _init_masks(self, obs: Observation, gen: torch.Generator):
        layers = dropout_layers(obs.model)
        if not layers:
            raise ValueError("Dropout Inversion needs a model with nn.Dropout layers")
        shapes = dropout_shapes(obs.model, obs.input_shape)
        return [torch.bernoulli(torch.full((obs.batch_size, *s), 1.0 - m.p), generator=gen).requires_grad_(True)
                for (_, m), s in zip(layers, shapes)]

    def _mask_leaves(self, masks):
        return list(masks)

    def _penalty(self, obs: Observation, masks):
        ps = [m.p for _, m in dropout_layers(obs.model)]
        return self.mask_weight * sum(((1 - mask.mean()) - p).abs() for mask, p in zip(masks, ps))

    def _project_masks(self, masks) -> None:
        for m in masks:
            m.clamp_(0.0, 1.0)

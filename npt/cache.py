"""The original model's residual stream at a few layers, kept per training window.

The base model is frozen, so the hidden states entering the first NPT layer (and the
original layers' outputs, the equivalence targets) are the same at every step: computing
them once per window, on first use, leaves each step only the NPT layers to run. When the
last few layers are converted that is most of the model."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.atomic import atomic_write
from npt.model import Residuals, ShardModel

FORMAT = "npt-residual-cache-v1"


class ResidualCache:
    """``layers`` of the original residual stream (see ``Residuals``) for each of ``windows``;
    memory: windows x seq_len x hidden x 4 bytes per layer, on the CPU."""

    def __init__(self, windows: torch.Tensor, layers: tuple[int, ...]):
        self.windows, self.layers = windows, tuple(sorted(set(layers)))
        self.states: dict[int, torch.Tensor] = {}
        self.filled = torch.zeros(len(windows), dtype=torch.bool)

    def get(self, model: ShardModel, indices: torch.Tensor, batch_size: int) -> Residuals:
        """The cached layers for ``windows[indices]``, on the model's device; windows not
        seen before are run through the original model first."""
        self.fill(model, indices, batch_size)
        device = model.inv_freq.device
        return {i: s[indices].to(device) for i, s in self.states.items()}

    def fill(self, model: ShardModel, indices: torch.Tensor, batch_size: int) -> None:
        missing = indices[~self.filled[indices]].unique()
        device = model.inv_freq.device
        for chunk in missing.split(batch_size):
            for i, state in model.residual_stream(self.windows[chunk].to(device), self.layers).items():
                if i not in self.states:
                    self.states[i] = torch.empty((len(self.windows), *state.shape[1:]), dtype=state.dtype)
                self.states[i][chunk] = state.cpu()
            self.filled[chunk] = True

    def save(self, path: str | Path) -> None:
        """Atomically, so that a study killed while saving recomputes rather than reads half a file."""
        payload = {"format": FORMAT, "layers": list(self.layers), "windows": self.windows, "filled": self.filled}
        payload["states"] = self.states
        with atomic_write(Path(path), "wb") as f:
            torch.save(payload, f)

    def load(self, path: str | Path) -> bool:
        """Take the states a previous run saved for the same windows and layers; False when
        there is no such file (or it was made for something else), leaving the cache empty."""
        path = Path(path)
        if not path.is_file():
            return False
        payload = torch.load(path, weights_only=True)
        if payload.get("format") != FORMAT or payload["layers"] != list(self.layers):
            return False
        if not torch.equal(payload["windows"], self.windows):
            return False
        self.filled, self.states = payload["filled"], payload["states"]
        return True

"""The adaptive weighting head logvar(t) of the sCM loss [P §4.2, EDM2]."""
import torch

from scm_fast.models.embedding import positional

__all__ = ["AdaptiveWeight"]


class AdaptiveWeight(torch.nn.Module):
    """The adaptive weighting head logvar(t) [P §4.2, EDM2]: positional(t) -> Linear -> (B,).
    The paper gives no architecture; this is EDM2's (a Fourier/positional embedding and one linear
    layer). It starts constant at init_logvar: the equilibrium logvar = log E[err^2] of the loss
    (objectives.initial_logvar) makes the first steps' weight exp(-logvar) the one it settles at."""

    def __init__(self, freq_dim=128, init_logvar=0.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear = torch.nn.Linear(freq_dim, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.constant_(self.linear.bias, float(init_logvar))

    def forward(self, t):
        with torch.autocast(t.device.type, enabled=False):
            return self.linear(positional(t, self.freq_dim).to(self.linear.weight.dtype)).squeeze(-1)

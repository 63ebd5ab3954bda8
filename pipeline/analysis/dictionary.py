"""Dictionaries of directions in one layer's activation space: PCA and a top-k sparse autoencoder.

Both fit token vectors x (d features of one target at one layer, one row per patch token):

* :func:`pca`: the top n principal components, from the mean and covariance summed in
  float64 part by part (:class:`Moments`), so the tokens never need to be in memory at
  once; each component is a unit row. A component's unit is its score, the projection of
  the centred token ``(x - mean) @ v``: uncentred, a component's projection carries the
  mean's, which noise and flat grey share with every photo. Its sign is a convention
  (eigenvectors have none): :func:`signs_away_from` turns each component away from the
  content-free images (flat grey, uniform noise), so that they score as low as the sign
  allows and its positive end, the one a visualization drives, is what they lack. A neuron
  or an SAE latent is so by nature: a flat or noisy image barely moves it;
* :func:`train_topk_sae`: a top-k sparse autoencoder (Gao et al. 2024, "Scaling and
  evaluating sparse autoencoders"): pre-activations ``(x - b_dec) @ W_enc + b_enc``, of
  which the k largest are kept after a ReLU, decoded by ``z @ W_dec + b_dec`` (from the k
  rows of W_dec in use, not the dense product); Adam on
  the squared error, decoder rows kept at unit norm. It trains on tokens scaled to unit
  mean squared distance from their mean (one learning rate whatever the layer's scale),
  and the scale is folded back into the biases, so the saved parameters take the model's
  own activations and a latent's pre-activation is the same function of them.

The quality of a fit is the share of the tokens' variance it explains (pca) or leaves
unexplained (sae: the fraction of variance unexplained, FVU =
sum ||x - x_hat||^2 / sum ||x - mean||^2, so 0 is a perfect reconstruction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

EVAL_CHUNK = 8192  # tokens per forward when measuring a fit over every token


@dataclass
class Moments:
    """Running count, sum and sum of outer products of token vectors, in float64."""

    width: int
    count: int = 0
    total: torch.Tensor = field(init=False)
    outer: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.width, dtype=torch.float64)
        self.outer = torch.zeros(self.width, self.width, dtype=torch.float64)

    def add(self, tokens: torch.Tensor) -> None:
        tokens = tokens.to(torch.float64)
        self.count += tokens.shape[0]
        self.total += tokens.sum(0)
        self.outer += tokens.T @ tokens

    def covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, self.outer / self.count - torch.outer(mean, mean)


@dataclass(frozen=True)
class PcaFit:
    components: torch.Tensor  # (n, d) float32, unit rows, by decreasing variance
    explained_variance_ratio: torch.Tensor  # (n,) share of the total variance along each component
    mean: torch.Tensor  # (d,)

    @property
    def explained_variance(self) -> float:
        return float(self.explained_variance_ratio.sum())


    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, d) token vectors -> (N, n) their components' scores, ``(x - mean) @ components.T``, in float64."""
        return (tokens.double() - self.mean.double()) @ self.components.double().T

    def flipped(self, signs: torch.Tensor) -> "PcaFit":
        """The same fit with component i multiplied by ``signs[i]`` (+1 or -1)."""
        return PcaFit((self.components * signs.view(-1, 1)).contiguous(), self.explained_variance_ratio, self.mean)

    def encoder(self) -> dict[str, torch.Tensor]:
        """The fit as the SAE encoder layout the sweep reads (pipeline.models.directions): ``W_enc`` (d, n) and
        ``b_dec`` (d) so that unit i, ``(x - b_dec) @ W_enc[:, i] + b_enc[i]``, is component i's score; ``W_dec``
        (n, d) so that ``scores @ W_dec + b_dec`` reconstructs the tokens from the kept components."""
        return {"W_enc": self.components.T.contiguous(), "b_enc": torch.zeros(self.components.shape[0]),
                "W_dec": self.components.contiguous(), "b_dec": self.mean.contiguous()}


def pca(moments: Moments, n: int) -> PcaFit:
    """The top ``n`` principal components of the tokens summed into ``moments`` (signs as eigh gives them:
    :func:`signs_away_from` fixes them)."""
    mean, covariance = moments.covariance()
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    variances, vectors = variances.flip(0)[:n].clamp(min=0), vectors.flip(1)[:, :n].T
    total = covariance.diagonal().sum()
    return PcaFit(vectors.float().contiguous(), (variances / total).float(), mean.float())


def signs_away_from(fit: PcaFit, references: torch.Tensor) -> torch.Tensor:
    """Per component, +1 or -1: the sign under which the largest of the ``references``' scores is lowest
    (``references`` (r, d), the pooled token vectors of content-free images). For a sign s the largest is
    s * max (s = +1) or -min (s = -1), so a component turns when max + min > 0 (+1 where it is 0)."""
    scores = fit.scores(references)
    return torch.where(scores.amax(0) + scores.amin(0) > 0, -1.0, 1.0)


class TopKSAE(nn.Module):
    """x -> z = TopK_k(ReLU((x - b_dec) @ W_enc + b_enc)) -> x_hat = z @ W_dec + b_dec."""

    def __init__(self, width: int, latents: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.empty(width, latents))
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.W_dec = nn.Parameter(torch.empty(latents, width))
        self.b_dec = nn.Parameter(torch.zeros(width))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The units a sweep maximizes: one per latent."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of each token's k active latents: a sparse code, (..., k) each."""
        return torch.relu(self.pre_activations(x)).topk(self.k, dim=-1)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # Only the k active rows of W_dec per token: n / k times less work than a dense z @ W_dec.
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, indices of the active latents)."""
        values, indices = self.encode(x)
        return self.decode(values, indices), indices

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors layout: W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d), float32."""
        return {name: getattr(self, name).detach().float().contiguous().cpu()
                for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


@dataclass(frozen=True)
class SaeFit:
    sae: TopKSAE
    fvu: float  # over every token, after training
    fvu_curve: list[tuple[int, float]]  # (step, mean FVU of the training batches since the previous point)
    dead_latents: int  # latents never among a token's top k over every token


def train_topk_sae(tokens: torch.Tensor, latents: int, k: int, steps: int, batch_size: int, lr: float, seed: int,
                   progress: Callable[[str], None] = lambda line: None, points: int = 10) -> SaeFit:
    """A top-k SAE of ``latents`` latents on ``tokens`` (N, d): ``steps`` Adam steps on random batches."""
    generator = torch.Generator().manual_seed(seed)
    tokens = tokens.float()
    mean = tokens.mean(0)
    scale = float((tokens - mean).pow(2).sum(1).mean().sqrt().clamp(min=1e-12))
    sae = TopKSAE(tokens.shape[1], latents, k)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(latents, tokens.shape[1], generator=generator))
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(mean / scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    curve, window = [], []
    every = max(1, steps // points)
    for step in range(1, steps + 1):
        batch = tokens[torch.randint(tokens.shape[0], (batch_size,), generator=generator)] / scale
        reconstruction, _ = sae(batch)
        error = (reconstruction - batch).pow(2).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        error.backward()
        optimizer.step()
        sae.normalize_decoder()
        # The batch's own variance about the set's mean (in these units, 1 on average over the set).
        window.append(float(error.detach()) / float((batch - mean / scale).pow(2).sum(1).mean()))
        if step % every == 0 or step == steps:
            curve.append((step, sum(window) / len(window)))
            progress(f"sae step {step}/{steps}: FVU {curve[-1][1]:.4f}")
            window = []
    with torch.no_grad():  # the scale folded back: the same latents, of the model's own activations
        sae.b_dec.mul_(scale)
        sae.b_enc.mul_(scale)
    fvu, dead = measure(sae, tokens, mean)
    return SaeFit(sae, fvu, curve, dead)


@torch.no_grad()
def measure(sae: TopKSAE, tokens: torch.Tensor, mean: torch.Tensor) -> tuple[float, int]:
    """(FVU over ``tokens``, latents that fire for none of them)."""
    error = variance = 0.0
    fired = torch.zeros(sae.W_enc.shape[1], dtype=torch.bool)
    for chunk in tokens.split(EVAL_CHUNK):
        values, indices = sae.encode(chunk)
        error += float((sae.decode(values, indices) - chunk).double().pow(2).sum())
        variance += float((chunk - mean).double().pow(2).sum())
        fired[indices[values > 0]] = True
    return error / variance, int((~fired).sum())

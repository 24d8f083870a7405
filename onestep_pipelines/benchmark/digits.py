"""The embedded digits benchmark: data, the FD-digits metric and the shipped assets.

Data are scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 images
with 17 grey levels, 10 classes), shipped with this package as ``assets/digits/digits.npz`` (45 KB, the same
arrays as uint8), so neither scikit-learn nor a download is needed. Images are used at their native 8x8
resolution, scaled to ``[-1, 1]``: upsampling adds no information and would only make every model and metric
slower.

FD-digits is the Fréchet distance (Heusel et al. 2017) between Gaussian fits of generated and real
images in the penultimate-layer features of a small digit classifier that we train and ship, plus
the classifier's accuracy on class-conditional samples. The real reference is a fixed half of the
data set (half B); the other half (A, the only digits any model here trains on) against it gives the
real-vs-real floor.

A second metric shares nothing with the classifier: **FD-pixels**, the Fréchet distance in a fixed
linear basis of the pixels (the first :data:`PIXEL_COMPONENTS` principal components of half A, 85 %
of its variance). Precision and recall (Kynkäänniemi et al. 2019, k-nearest-neighbour manifolds with
``k`` = 3 in the classifier's features) tell a sharp but narrow generator (high precision, low
recall) from a broad but blurry one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits")
TEACHER_DIR = os.path.join(ASSETS, "teacher")
CLASSIFIER_DIR = os.path.join(ASSETS, "classifier")
REWARD_CLASSIFIER_DIR = os.path.join(ASSETS, "reward_classifier")
DATA_FILE = os.path.join(ASSETS, "digits.npz")
PIXEL_COMPONENTS = 16  # principal components of half A's pixels that FD-pixels is measured in
NEIGHBOURS = 3  # k of precision / recall (Kynkäänniemi et al. 2019's choice)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` and their int64 labels (from the shipped copy)."""
    with np.load(DATA_FILE) as data:
        images = torch.from_numpy(data["images"].astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
        return images, torch.from_numpy(data["labels"].astype(np.int64))


def real_halves() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed split of the real digits into two halves ``(images, labels)``: A (899) and B, the reference (898)."""
    images, labels = load_digits_images()
    perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(images)))
    a, b = perm[: (len(perm) + 1) // 2], perm[(len(perm) + 1) // 2 :]
    return (images[a], labels[a]), (images[b], labels[b])


def parse_class_labels(labels, num_classes: int = 10) -> torch.Tensor:
    """Class labels from ints or digit names ("seven", "7"); a clear error for anything else."""
    if isinstance(labels, (int, str, np.integer)) or (isinstance(labels, torch.Tensor) and labels.ndim == 0):
        labels = [labels]
    out = []
    for label in labels:
        if isinstance(label, torch.Tensor):
            label = label.item()
        if isinstance(label, str):
            key = label.strip().lower()
            if key in DIGIT_NAMES:
                label = DIGIT_NAMES.index(key)
            elif key.isdigit():
                label = int(key)
            else:
                raise ValueError(f"unknown digit name {label!r}; use 0-9 or one of {list(DIGIT_NAMES)}.")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
            raise ValueError(f"class label {label!r} is not a class of this model (0-{num_classes - 1}).")
        out.append(int(label))
    if not out:
        raise ValueError("class_labels is empty.")
    return torch.tensor(out, dtype=torch.long)


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Small CNN on 8x8 digits; ``features`` (penultimate layer) define FD-digits."""

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitsRewardClassifier(ModelMixin, ConfigMixin):
    """The reward model of reward post-training: an MLP on the 64 pixels, trained on half A of the digits only with
    pixel noise, so that its log-probabilities vary smoothly with the image. It shares neither architecture, weights
    nor training data with FD-digits' classifier: a student that maximises its reward is scored by a model it never
    saw."""

    @register_to_config
    def __init__(self, width: int = 256, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (Fréchet 1957; Heusel et al. 2017).

    The trace of ``(C1 C2)^(1/2)`` is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``C1^(1/2) C2 C1^(1/2)`` (same spectrum), which stays exact when the
    covariances are singular (dead ReLU features), where a general matrix square root is unstable.
    """
    root1 = _psd_sqrt(np.asarray(cov1, dtype=np.float64))
    middle = root1 @ np.asarray(cov2, dtype=np.float64) @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_covmean)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclass
class Score:
    """One row of the benchmark: FD-digits, class accuracy, FD-pixels, precision and recall (see the module
    docstring)."""

    fd: float
    acc: float
    fd_pixels: float
    precision: float
    recall: float


def pixel_basis(images: torch.Tensor, components: int = PIXEL_COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, basis)``: the mean pixel vector of ``images`` and their first ``components`` principal directions
    (``(64, components)``, float64), from a singular value decomposition of the centred pixels."""
    pixels = images.flatten(1).double().cpu().numpy()
    mean = pixels.mean(axis=0)
    _, _, vt = np.linalg.svd(pixels - mean, full_matrices=False)
    return mean, vt[:components].T


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each feature vector to its ``k``-th nearest neighbour among the others (itself excluded)."""
    distances = torch.cdist(torch.from_numpy(features), torch.from_numpy(features))
    return distances.kthvalue(k + 1, dim=1).values.numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS, real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-3): precision is the share of ``fake`` inside
    the union of balls around each ``real`` vector of radius its ``k``-th neighbour distance; recall the share of
    ``real`` inside the fake set's balls."""
    between = torch.cdist(torch.from_numpy(real), torch.from_numpy(fake))  # (real, fake)
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    precision = (between <= torch.from_numpy(real_radii)[:, None]).any(dim=0).double().mean()
    recall = (between <= torch.from_numpy(knn_radii(fake, k))[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


class DigitsMetric:
    """FD-digits and class accuracy against the fixed real reference half (see module docstring).

    The classifier runs on ``device`` (default: the CPU); images may come from any device and dtype.
    """

    def __init__(self, classifier: DigitsClassifier | None = None, device: str | torch.device | None = None):
        self.classifier = (classifier or DigitsClassifier.from_pretrained(CLASSIFIER_DIR)).eval()
        if device is not None:
            self.classifier.to(device)
        (self.images_a, self.labels_a), (self.images_b, self.labels_b) = real_halves()
        self.ref_features = self.features(self.images_b)
        self.ref_stats = gaussian_stats(self.ref_features)
        self.ref_radii = knn_radii(self.ref_features, NEIGHBOURS)
        self.pixel_mean, self.pixel_basis = pixel_basis(self.images_a)
        self.ref_pixel_stats = gaussian_stats(self.pixel_features(self.images_b))
        self._copy_thresholds: dict[float, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(self._check(images)).double().cpu().numpy()

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images).detach().to(self.device, torch.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digit images must have shape (N, 1, 8, 8) in [-1, 1], got {tuple(images.shape)}.")
        if len(images) < 2:
            raise ValueError("FD needs at least 2 images.")
        return images

    def pixel_features(self, images: torch.Tensor) -> np.ndarray:
        """Coordinates of the images in the fixed pixel basis (:func:`pixel_basis` of half A)."""
        return (self._check(images).flatten(1).double().cpu().numpy() - self.pixel_mean) @ self.pixel_basis

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(*gaussian_stats(self.features(images)), *self.ref_stats)

    def fd_pixels(self, images: torch.Tensor) -> float:
        """FD-pixels: the Fréchet distance to half B in the fixed pixel basis (no classifier involved)."""
        return frechet_distance(*gaussian_stats(self.pixel_features(images)), *self.ref_pixel_stats)

    def precision_recall(self, images: torch.Tensor, k: int = NEIGHBOURS) -> tuple[float, float]:
        """Precision and recall against half B in the classifier's features (:func:`precision_recall`)."""
        return precision_recall(self.ref_features, self.features(images), k, self.ref_radii if k == NEIGHBOURS else None)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        pred = self.classifier(self._check(images)).argmax(dim=1)
        return float((pred == torch.as_tensor(labels).to(pred.device)).float().mean())

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Score:
        features = self.features(images)
        precision, recall = precision_recall(self.ref_features, features, NEIGHBOURS, self.ref_radii)
        return Score(fd=frechet_distance(*gaussian_stats(features), *self.ref_stats), acc=self.accuracy(images, labels),
                     fd_pixels=self.fd_pixels(images), precision=precision, recall=recall)

    @staticmethod
    def row(score: Score) -> dict:
        """A score as the columns of a benchmark row: ``FD-digits``, ``FD-pixels``, ``precision``, ``recall``,
        ``accuracy``."""
        return {"FD-digits": score.fd, "FD-pixels": score.fd_pixels, "precision": score.precision, "recall": score.recall, "accuracy": score.acc}

    @torch.no_grad()
    def copy_fraction(self, images: torch.Tensor, quantile: float = 0.01) -> float:
        """Memorisation check: the fraction of ``images`` whose nearest digit of half A (the only real digits a student
        may train on) is closer, in pixels, than the ``quantile`` of the distances from each real digit of half B to
        its nearest digit of half A. Real digits that copy nothing score about ``quantile`` (0.01); a generator that
        reproduces its training digits scores far more, whatever its FD."""
        if quantile not in self._copy_thresholds:  # (the real digits' distances: once per metric and quantile)
            self._copy_thresholds[quantile] = torch.quantile(self._nearest(self.images_b, self.images_a), quantile)
        return float((self._nearest(images, self.images_a) < self._copy_thresholds[quantile]).double().mean())

    @torch.no_grad()
    def nearer_training_fraction(self, images: torch.Tensor) -> float:
        """Memorisation check without a threshold, after the data-copying test of Meehan et al. 2020 ("A
        Non-Parametric Test to Detect Data-Copying in Generative Models"): the fraction of ``images`` whose nearest
        digit of half A (trained on) is closer, in pixels, than their nearest digit of half B (never trained on; the
        halves are the same size). Samples of a model that generalises are as close to one half as to the other:
        about 0.5 (real digits, each against the other real digits: 0.48 for half B, 0.50 for half A). A model pulled
        toward its training digits scores more even when none of its samples is a copy, which :meth:`copy_fraction`
        (a tail of the distances) only sees in part."""
        return float((self._nearest(images, self.images_a) < self._nearest(images, self.images_b)).double().mean())

    def memorisation(self, images: torch.Tensor) -> dict:
        """The memorisation columns of a benchmark row: ``copies`` (:meth:`copy_fraction`) and ``nearer-A``
        (:meth:`nearer_training_fraction`)."""
        return {"copies": self.copy_fraction(images), "nearer-A": self.nearer_training_fraction(images)}

    def _nearest(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Pixel distance from each image to its nearest image of ``reference`` (float64, on the CPU)."""
        return torch.cdist(self._check(images).flatten(1).double().cpu(), reference.flatten(1).double()).min(dim=1).values

    def real_vs_real(self) -> Score:
        """The floor: real half A against real half B."""
        return self.score(self.images_a, self.labels_a)


def eval_labels(num_samples: int) -> torch.Tensor:
    """Balanced class labels 0, 1, ..., 9, 0, 1, ... for conditional evaluation."""
    return torch.arange(num_samples) % 10
